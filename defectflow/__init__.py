"""defectflow: hybrid-quality defect ground states and charge-transition levels via multi-fidelity MACE."""

__version__ = "0.1.0"
