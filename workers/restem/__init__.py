"""ReSTEM outer loop: learn the namespace's self-edit policy from rewarded self-edits.

`loop.RestemLoop` is engine-agnostic: it runs over the Protocols in `protocols` (sampler,
inner loop, policy trainer, reporter), so the worker runs it through the gateway and the
registry (`workers.restem.job`) and a benchmark can run it in-process with its own engine.
"""

from workers.restem.loop import (
    GateOutcome,
    RestemLoop,
    RestemParts,
    RestemResult,
    RoundResult,
    RunShape,
    split_documents,
)
from workers.restem.parts import (
    AdapterHost,
    ChatSampler,
    PeftInnerLoop,
    PeftPolicyTrainer,
    PolicyStore,
    TrainingStopped,
)
from workers.restem.protocols import (
    InnerLoop,
    NullReporter,
    PolicyExample,
    PolicyRef,
    PolicyTrainer,
    Reporter,
    SampleRequest,
    SamplingOptions,
    SelfEditSampler,
    TrialResult,
)
from workers.restem.selection import FormatStats, ScoredEdit, best_per_document, reward_of

__all__ = [
    "AdapterHost",
    "ChatSampler",
    "FormatStats",
    "GateOutcome",
    "InnerLoop",
    "NullReporter",
    "PeftInnerLoop",
    "PeftPolicyTrainer",
    "PolicyExample",
    "PolicyRef",
    "PolicyStore",
    "PolicyTrainer",
    "Reporter",
    "RestemLoop",
    "RestemParts",
    "RestemResult",
    "RoundResult",
    "RunShape",
    "SampleRequest",
    "SamplingOptions",
    "ScoredEdit",
    "SelfEditSampler",
    "TrainingStopped",
    "TrialResult",
    "best_per_document",
    "reward_of",
    "split_documents",
]
