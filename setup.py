"""Build of pyverbs_kv (Cython over rdma-core) and the pure-Python kvcache."""
import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

MODULES = ["libibverbs_enums", "librdmacm", "base", "device", "pd", "mr", "cq", "qp", "cm"]

extensions = [
    Extension(f"pyverbs_kv.{name}", [f"pyverbs_kv/{name}.pyx"],
              libraries=["ibverbs", "rdmacm"],
              include_dirs=[numpy.get_include()],
              define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
              extra_compile_args=["-O2"])
    for name in MODULES
]

setup(
    ext_modules=cythonize(extensions, language_level=3,
                          compiler_directives={"boundscheck": False, "wraparound": False,
                                               "embedsignature": True}),
)
