"""pallet: a container engine built the way Docker was."""

__version__ = "0.1.0"
