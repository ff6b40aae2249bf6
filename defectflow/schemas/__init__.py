"""Every document defectflow's jobs pass and store (pydantic v2), one module per step.

Units follow ASE: energies in eV, forces in eV/Å, stress in eV/Å³ (Voigt order xx, yy, zz, yz, xz, xy, ASE sign
convention: positive = tensile), lengths in Å, times in seconds of wall clock. Nothing here imports a step, an
engine or the campaign: documents are the lowest layer.
"""

from defectflow.schemas.core import (
    Frame,
    MSONDict,
    RelaxTrajectory,
    Structure,
    as_structure,
    group_key,
    settings_digest,
)
from defectflow.schemas.generate import DistortedStructure, DistortionSet, GenerationResult
from defectflow.schemas.label import BulkReference, LabelledSet
from defectflow.schemas.levels import LevelEntry, LevelsResult, TransitionLevel
from defectflow.schemas.relax import DistortionSummary, RelaxRecord, TrainingSet
from defectflow.schemas.search import (
    CampaignResult,
    GroundStateRecord,
    GroupVerification,
    KeptGroundState,
    Minimum,
    PathFrame,
    RefineLeftover,
    RoundRecord,
    SearchResult,
    SearchStart,
    TopUpFrame,
    Verification,
)
from defectflow.schemas.select import SelectedFrame, Selection
from defectflow.schemas.train import (
    ComparisonRow,
    ComponentRun,
    ErrorStats,
    Metrics,
    PCAResult,
    SetMetrics,
    TrainedModel,
    TrainingResult,
)

__all__ = [
    "BulkReference", "CampaignResult", "ComparisonRow", "ComponentRun", "DistortedStructure", "DistortionSet",
    "DistortionSummary", "ErrorStats", "Frame", "GenerationResult", "GroundStateRecord", "KeptGroundState", "LabelledSet", "LevelEntry",
    "LevelsResult", "MSONDict", "Metrics", "Minimum", "PCAResult", "PathFrame", "GroupVerification", "RefineLeftover", "TopUpFrame", "RelaxRecord", "RelaxTrajectory", "RoundRecord", "SearchResult",
    "SearchStart", "SelectedFrame", "Selection", "SetMetrics", "Structure", "TrainedModel", "TrainingResult",
    "TrainingSet", "TransitionLevel", "Verification", "as_structure", "group_key",
    "settings_digest",
]
