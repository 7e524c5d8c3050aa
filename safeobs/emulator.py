"""``safeobs.emulator``: the same module object as :mod:`safeobs.kernels.emulator` (monkeypatching and private
names work on either name)."""

import sys

from .kernels import emulator as _module

sys.modules[__name__] = _module
