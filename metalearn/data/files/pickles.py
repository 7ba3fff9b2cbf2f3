"""A restricted unpickler for the pickled data sets users download (miniImageNet, tieredImageNet,
CIFAR): numpy arrays, dtypes, scalars and plain containers load; nothing else can be called."""

import pickle

# (module, name) pairs the distributed pickles hold, under numpy 1 and 2 and Python 2 and 3 names.
_NUMPY = (("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer"))
SAFE_GLOBALS = {
    (f"numpy.{core}.{module}", name) for core in ("core", "_core") for module, name in _NUMPY
}
SAFE_GLOBALS |= {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}
SAFE_GLOBALS |= {("collections", "OrderedDict")}
SAFE_GLOBALS |= {
    (builtins, name)
    for builtins in ("builtins", "__builtin__")
    for name in ("set", "frozenset", "bytearray", "dict", "list", "tuple", "int", "float", "str")
}


class Refused(pickle.UnpicklingError):
    """A pickle asked for something a data file never holds: not a genuine file."""


class Restricted:
    """Mix into a pickle.Unpickler: find_class refuses everything outside SAFE_GLOBALS."""

    def find_class(self, module: str, name: str):
        if (module, name) in SAFE_GLOBALS:
            return super().find_class(module, name)
        raise Refused(f"refusing to load {module}.{name} from a data pickle")


class SafeUnpickler(Restricted, pickle.Unpickler):
    """pickle.Unpickler that loads data only (see SAFE_GLOBALS)."""
