"""The net_bridge plugin: registered here, driver not written yet (see the open issue).

It reports itself skipped so that `pallet info` says why it is unavailable.
"""

from pallet.errors import PluginSkip

raise PluginSkip("net_bridge: not implemented yet")
