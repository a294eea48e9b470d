"""Test helpers shipped with pallet, for pallet itself and for third parties.

:mod:`pallet.testing.conformance` is the storage driver conformance suite, a pytest
plugin (registered through the ``pytest11`` entry point, or ``-p
pallet.testing.conformance``): subclass :class:`~pallet.testing.conformance.DriverConformance`
in a test module and every registered storage driver (or the ones named with
``--pallet-driver``) runs the whole suite, the driver's name in each test ID.
"""
