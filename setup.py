"""Build of pyverbs_kv (Cython over rdma-core) and the pure-Python kvcache."""
import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

VERBS_MODULES = ["libibverbs_enums", "librdmacm", "base", "device", "pd", "mr", "cq", "qp",
                 "cm"]
# Modules that must load where libibverbs is missing link nothing of rdma-core.
PLAIN_MODULES = ["sgio", "pieces"]
# Accelerator runtimes are dlopen'ed at first use, never linked: the package builds and
# imports where CANN or CUDA is missing (pyverbs_kv/acl.pyx says where each is looked for).
ACCEL_MODULES = ["accel", "acl", "cuda"]


def extension(name, libraries):
    return Extension(f"pyverbs_kv.{name}", [f"pyverbs_kv/{name}.pyx"], libraries=libraries,
                     include_dirs=[numpy.get_include()],
                     define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
                     extra_compile_args=["-O2"])


extensions = ([extension(name, ["ibverbs", "rdmacm"]) for name in VERBS_MODULES]
              + [extension(name, []) for name in PLAIN_MODULES]
              + [extension(name, ["dl"]) for name in ACCEL_MODULES])

setup(
    ext_modules=cythonize(extensions, language_level=3,
                          compiler_directives={"boundscheck": False, "wraparound": False,
                                               "embedsignature": True}),
)
