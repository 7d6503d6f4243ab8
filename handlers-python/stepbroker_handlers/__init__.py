"""stepbroker handler pools for Python.

    from stepbroker_handlers import HandlerPool, PermanentError

    pool = HandlerPool("tcp://127.0.0.1:5555", capacity=4)

    @pool.handler("process_payment")
    def process_payment(step):
        return {"charged": step.inputs["validate_order"]["amount"]}

    pool.run()
"""

__version__ = "0.1.0"

from .errors import Cancelled, PermanentError, RetryableError, RetryAfter, StepError  # noqa: E402
from .pool import HandlerPool, default_pool_id  # noqa: E402
from .protocol import Codec, ProtocolError, SchemaValidators, find_schema_dir  # noqa: E402
from .step import Step, Trace  # noqa: E402

__all__ = [
    "__version__",
    "HandlerPool",
    "Step",
    "Trace",
    "StepError",
    "RetryableError",
    "PermanentError",
    "RetryAfter",
    "Cancelled",
    "Codec",
    "ProtocolError",
    "SchemaValidators",
    "find_schema_dir",
    "default_pool_id",
]
