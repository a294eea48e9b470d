"""The storage_devmapper plugin: registered here, driver not written yet (see the open issue).

It reports itself skipped so that `pallet info` says why it is unavailable.
"""

from pallet.errors import PluginSkip

raise PluginSkip("storage_devmapper: not implemented yet")
