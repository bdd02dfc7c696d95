# The public names of scanlab.serve, imported on first use (see __init__.py).
from .api import create_app as create_app
from .engine import Engine as Engine
from .engine import EngineBusy as EngineBusy
from .engine import Request as Request
from .server import Settings as Settings
from .server import running as running
from .server import serve as serve
