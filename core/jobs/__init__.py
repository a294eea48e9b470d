"""The core's own jobs. They register through ``pallet_register_jobs`` like any plugin's."""
