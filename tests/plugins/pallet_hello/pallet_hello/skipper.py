"""A plugin that cannot work here: it raises PluginSkip at import, with the reason."""

from pallet.errors import PluginSkip

raise PluginSkip("needs the hello hardware")
