# The public names of scanlab.finetune, imported on first use (see __init__.py).
from . import data as data
from .adapters import TARGETS as TARGETS
from .adapters import LoraConfig as LoraConfig
from .adapters import adapt as adapt
from .adapters import init_adapters as init_adapters
from .adapters import merged as merged
from .config import FinetuneConfig as FinetuneConfig
from .data import DataError as DataError
from .export import save_merged as save_merged
from .run import FinetuneResult as FinetuneResult
from .run import finetune as finetune
from .run import saved_run as saved_run
from .run import with_trained as with_trained
from .step import FinetuneState as FinetuneState
from .step import finetune_chunk as finetune_chunk
from .step import finetune_loop as finetune_loop
