"""pw.x settings of the ``qe`` engine and the unit constants it converts with."""

from __future__ import annotations

from typing import ClassVar, Literal

from ase.io.espresso import units as _ase_units
from pydantic import Field

from defectflow.engines.base import EngineSettings
from defectflow.schemas import settings_digest

__all__ = ["DEFAULT_PSEUDO_DIR", "HYBRID_DFT", "RY_IN_EV", "RY_PER_BOHR_IN_EV_PER_ANG", "QESettings"]

DEFAULT_PSEUDO_DIR = "/usr/share/espresso/pseudo"
#: xc setting → QE ``input_dft`` of the hybrids (QE's 'hse' uses ω = 0.106 bohr⁻¹)
HYBRID_DFT = {"HSE06": "hse", "PBE0": "pbe0"}

# The units ASE's espresso reader converts with (CODATA 2006), so our energies, forces and thresholds agree.
RY_IN_EV = _ase_units["Ry"]  # 13.6057 eV
RY_PER_BOHR_IN_EV_PER_ANG = _ase_units["Ry"] / _ase_units["Bohr"]  # 25.7110 eV/Å


class QESettings(EngineSettings):
    """pw.x settings. Energies in Ry as in QE's input; the engine reports eV."""

    engine: Literal["qe"] = "qe"
    xc: Literal["PBE", "LDA", "HSE06", "PBE0"] = Field(
        "PBE",
        description="PBE, LDA (QE 'pz', LDA pseudopotentials), or the hybrids HSE06 (QE 'hse', ω = 0.106 bohr⁻¹) "
        "/ PBE0 (QE 'pbe0')",
    )
    ecutwfc: float = Field(30.0, gt=0, description="Plane-wave cutoff for wavefunctions in Ry")
    ecutrho: float | None = Field(None, gt=0, description="Charge-density cutoff in Ry (default 4 × ecutwfc)")
    ecutfock: float | None = Field(
        None, gt=0, description="Exact-exchange cutoff in Ry for hybrids (default 2 × ecutwfc)"
    )
    kpts: tuple[int, int, int] = Field(
        (1, 1, 1),
        description="Monkhorst-Pack mesh (unshifted); (1, 1, 1) = Γ only, run with QE's gamma tricks",
    )
    pseudo_dir: str | None = Field(
        None, description="Pseudopotential directory (default $ESPRESSO_PSEUDO or /usr/share/espresso/pseudo)"
    )
    pseudopotentials: dict[str, str] = Field(
        default_factory=dict,
        description="Element → UPF file name in pseudo_dir (overrides the automatic choice)",
    )
    smearing: str = Field("fd", description="QE smearing (fd = Fermi-Dirac, gaussian, mv, mp)")
    degauss: float = Field(0.002, ge=0, description="Smearing width in Ry")
    starting_magnetization: float | None = Field(
        None,
        ge=-1,
        le=1,
        description="QE starting_magnetization (fraction of valence charge, −1..1) of every species when "
        "nspin = 2; None: 1/N_electrons, i.e. an initial moment of 1 μB for the cell (a doublet guess)",
    )
    empty_bands: int | None = Field(
        None,
        ge=1,  # smearing needs at least one: with nbnd = occupied pw.x stops ("cannot bracket Ef")
        description="Empty Kohn-Sham bands (per spin) above the occupied ones, for the CBM: nbnd = "
        "ceil(N_electrons/2) + empty_bands; None: max(4, ceil(10 % of the occupied bands)). "
        "input_data {system: {nbnd: ...}} overrides",
    )
    conv_thr: float = Field(1e-7, gt=0, description="SCF convergence threshold in Ry (whole cell)")
    etot_conv_thr: float = Field(
        1e-4, gt=0, description="Relaxation: energy change between ionic steps in Ry (QE needs both criteria)"
    )
    mixing_beta: float = Field(0.4, gt=0, le=1, description="Broyden mixing factor (dimensionless)")
    electron_maxstep: int = Field(100, gt=0, description="Maximum number of SCF iterations")
    mpi_procs: int | None = Field(None, ge=1, description="MPI ranks (default: all usable cores)")
    command: str | None = Field(None, description="pw.x executable (default: pw.x on PATH)")
    timeout_s: float | None = Field(
        None, gt=0, description="Kill pw.x after this many seconds (None: no limit)"
    )
    keep_outdir: bool = Field(
        False, description="Keep QE's outdir (wavefunctions, charge density) in the workdir after the run"
    )
    input_data: dict[str, dict] = Field(
        default_factory=dict,
        description="Extra namelist entries in QE units, e.g. {system: {nbnd: 40}}; override the engine's",
    )
    electrostatic_potential: bool = Field(
        False,
        description="After each single point, write the electrostatic potential (pp.x plot_num=11: local ionic + "
        "Hartree) to potential.cube.gz and keep its planar averages (eV) and site potentials (V) on the Frame, for "
        "the FNV/eFNV finite-size corrections. A campaign switches it on for the bulk and verification single "
        "points when levels.correction needs it",
    )
    pp_command: str | None = Field(None, description="pp.x executable (default: pp.x on PATH)")

    _digest_exclude: ClassVar[tuple[str, ...]] = EngineSettings._digest_exclude + (
        "timeout_s", "keep_outdir", "pp_command")

    def digest(self) -> str:
        """Digest of the settings that change results; ``electrostatic_potential`` counts only when on (it adds
        to the Frame and leaves the energy alone), so the digests of settings without it are unchanged."""
        data = self.model_dump(mode="json", exclude=set(self._digest_exclude))
        if not data["electrostatic_potential"]:
            del data["electrostatic_potential"]
        return settings_digest(data)
