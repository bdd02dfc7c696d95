# The public names of scanlab, imported on first use (see __init__.py).
from .recurrence import LaxScanModule as LaxScanModule
from .recurrence import NNScanModule as NNScanModule
from .recurrence import lax_scan_in_module as lax_scan_in_module
