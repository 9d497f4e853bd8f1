"""Every verbs and rdma_cm enumeration value, importable from Python:
``from pyverbs_kv.enums import IBV_WR_RDMA_WRITE``. The enum classes
(``ibv_wr_opcode``, ...) are here too, for names of values."""
import enum as _enum

from pyverbs_kv import libibverbs_enums as _verbs, librdmacm as _cm


def _export(module):
    for name in dir(module):
        value = getattr(module, name)
        if name.startswith(("IBV_", "RDMA_")):
            globals()[name] = value
        elif isinstance(value, type) and issubclass(value, _enum.Enum):
            globals()[name] = value
            for member in value:
                globals()[member.name] = member


_export(_verbs)
_export(_cm)
