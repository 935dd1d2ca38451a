"""probe: test connectivity to many database endpoints at once.

The public API::

    from probe import Prober, ProbeSettings, run_batch

    response = run_batch({"jobs": [...]})            # sync helper
    response = await Prober(settings).run(body)       # in an event loop
    async with Prober().stream(body) as results:      # as they complete
        async for index, result in results: ...
"""

from probe.errors import ErrorCode, ProbeFailure, RequestInvalid
from probe.models import BatchConnectionRequest, BatchConnectionResponse, CheckJobResp, Endpoint
from probe.runner import Outcome, Prober, ProbeSettings, run_batch

__all__ = [
    "BatchConnectionRequest",
    "BatchConnectionResponse",
    "CheckJobResp",
    "Endpoint",
    "ErrorCode",
    "Outcome",
    "ProbeFailure",
    "ProbeSettings",
    "Prober",
    "RequestInvalid",
    "run_batch",
]
