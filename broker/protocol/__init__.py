"""The protocol between the broker and the workers, and between the front doors and the broker.

Both sides import it; it imports neither (`.ci/check-package` checks the contract with
import-linter). It owns every message and its schema (`messages`, `commands`, `status`, `spec`,
`trial_summary`, `receipts`; the wire format in `codec` and `schema`), every Redis name and
queue name (`keys`), who is alive (`heartbeat` for worker pools, `liveness` for the broker and a
remote Optimizer), the RQ queue and its serializer (`queue`), signing and the role keys
(`signing`, `keyring`), the objective contract (`objectives`), the counters of refused and
dropped messages (`counters`), the errors that name a field (`field_error`), and the fixed
choices (`choices`: samplers, pruners, directions, trial-call methods).
"""

from optuna_rq.errors import ProtocolError
from optuna_rq.protocol.choices import Direction, Pruner, Sampler, TrialMethod
from optuna_rq.protocol.codec import (
    DEFAULT_MAX_MESSAGE_BYTES,
    MAX_CONTAINER_LEN,
    MAX_DEPTH,
    PROTOCOL_VERSION,
    Param,
    check_params,
    decode_map,
)
from optuna_rq.protocol.commands import (
    COMMAND_ID_PATTERN,
    Cancel,
    Change,
    Command,
    Delete,
    Enqueue,
    Submit,
    decode_command,
    enqueue_commands,
    sendable,
)
from optuna_rq.protocol.heartbeat import PoolHeartbeat, live_pools, workers_on
from optuna_rq.protocol.keyring import KeyRing, Role, generate_keyrings
from optuna_rq.protocol.keys import (
    CALL_FIELD,
    CANCEL_TTL_S,
    DEFAULT_LEASE_TTL_S,
    DEFAULT_QUEUE,
    GROUP,
    REPLY_TTL_S,
    RESULT_FIELD,
    WAKE_FIELD,
    WAKE_MAXLEN,
    AttemptId,
    Keys,
    check_incarnation,
    check_queue_name,
    new_incarnation,
)
from optuna_rq.protocol.messages import (
    CallError,
    FailReason,
    Outcome,
    RelativeView,
    TrialCall,
    TrialCallReply,
    TrialRequest,
    TrialResult,
)
from optuna_rq.protocol.objectives import (
    TRIAL_PARAMETER,
    describe_exception,
    error_headline,
    inputs_mismatch,
    judge_return,
    objective_path_of,
    parse_objective_path,
)
from optuna_rq.protocol.queue import RUN_TRIAL, MsgpackSerializer, trial_queue
from optuna_rq.protocol.receipts import RECEIPT_TTL_S, BulkReceipt, read_receipts
from optuna_rq.protocol.schema import Message
from optuna_rq.protocol.signing import (
    ENV_KEY,
    ENV_KEY_FILE,
    ENV_SECRET,
    ENV_SECRET_FILE,
    Record,
    Signer,
)
from optuna_rq.protocol.spec import StudySpec, open_stored_spec, seal_stored_spec
from optuna_rq.protocol.spec_bounds import check_max_retries, check_trial_timeout
from optuna_rq.protocol.status import StudyState, StudyStatus, refuse_if_closed
from optuna_rq.protocol.trial_summary import (
    RefusedTrial,
    TrialStateName,
    TrialSummary,
    read_trial_summaries,
)

__all__ = [
    "RECEIPT_TTL_S",
    "TRIAL_PARAMETER",
    "BulkReceipt",
    "COMMAND_ID_PATTERN",
    "AttemptId",
    "CALL_FIELD",
    "CANCEL_TTL_S",
    "DEFAULT_LEASE_TTL_S",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_QUEUE",
    "ENV_KEY",
    "ENV_KEY_FILE",
    "ENV_SECRET",
    "ENV_SECRET_FILE",
    "GROUP",
    "MAX_CONTAINER_LEN",
    "MAX_DEPTH",
    "PROTOCOL_VERSION",
    "REPLY_TTL_S",
    "RESULT_FIELD",
    "WAKE_FIELD",
    "WAKE_MAXLEN",
    "RUN_TRIAL",
    "CallError",
    "Cancel",
    "Change",
    "Delete",
    "Direction",
    "Enqueue",
    "enqueue_commands",
    "generate_keyrings",
    "Command",
    "FailReason",
    "KeyRing",
    "Keys",
    "Message",
    "MsgpackSerializer",
    "Outcome",
    "Param",
    "PoolHeartbeat",
    "Record",
    "Role",
    "ProtocolError",
    "Pruner",
    "Sampler",
    "Signer",
    "StudySpec",
    "StudyState",
    "StudyStatus",
    "Submit",
    "RefusedTrial",
    "TrialStateName",
    "TrialSummary",
    "TrialCall",
    "TrialCallReply",
    "TrialMethod",
    "RelativeView",
    "TrialRequest",
    "TrialResult",
    "check_incarnation",
    "check_max_retries",
    "check_params",
    "check_queue_name",
    "check_trial_timeout",
    "decode_command",
    "decode_map",
    "describe_exception",
    "error_headline",
    "inputs_mismatch",
    "judge_return",
    "live_pools",
    "new_incarnation",
    "open_stored_spec",
    "read_receipts",
    "objective_path_of",
    "parse_objective_path",
    "refuse_if_closed",
    "read_trial_summaries",
    "seal_stored_spec",
    "sendable",
    "trial_queue",
    "workers_on",
]
