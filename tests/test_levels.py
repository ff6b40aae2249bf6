"""Levels: hand-checked CTLs through doped, and the image-charge correction against the analytic result."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from pymatgen.core import Lattice, Structure

from defectflow.levels import LevelEntry, compute_levels, image_charge_correction

sys.path.insert(0, str(Path(__file__).parent))
from test_relax_flow import small_campaign  # noqa: E402

ALPHA_SC = 2.837297  # Madelung constant of a simple-cubic lattice of point charges in a neutralising background
E2_OVER_4PI_EPS0 = 14.399645  # eV·Å


@pytest.mark.parametrize("q", [1, -1, 2])
def test_image_charge_matches_makov_payne_for_a_cubic_cell(q):
    L = 10.862
    s = Structure(Lattice.cubic(L), ["Si"], [[0, 0, 0]])
    expected = q**2 * ALPHA_SC * E2_OVER_4PI_EPS0 / (2 * 11.7 * L)
    assert image_charge_correction(s, q, 11.7) == pytest.approx(expected, rel=1e-4)
    assert image_charge_correction(s, 0, 11.7) == 0.0


@pytest.fixture(scope="module")
def generation(tmp_path_factory):
    from defectflow.generate import generate

    return generate(small_campaign(tmp_path_factory.mktemp("lev"), charges=(-1, 0, 1)))


def _entries(generation, energies):
    return [LevelEntry(defect=ds.defect, charge=ds.charge, energy=energies[ds.charge],
                       structure=ds.structures[0].structure, defect_entry=ds.defect_entry)
            for ds in generation.distortion_sets]


def test_ctls_by_hand_through_doped(generation, tmp_path):
    # E_f(q) = E_q - E_bulk + q (E_VBM + E_F)  =>  eps(q/q') = (E_q' - E_q) / (q - q') - E_VBM
    energies = {1: -99.5, 0: -100.0, -1: -99.0}
    vbm, gap = 0.3, 1.1
    res = compute_levels(_entries(generation, energies), generation.bulk_supercell, -110.0, vbm, gap,
                         correction="none", plot_dir=tmp_path)
    levels = {(t.q_from, t.q_to): t for t in res.transition_levels}
    assert levels[(1, 0)].level == pytest.approx(-0.5 - vbm) and not levels[(1, 0)].in_gap
    assert levels[(0, -1)].level == pytest.approx(1.0 - vbm) and levels[(0, -1)].in_gap
    # formation energy at E_F = VBM: E_q - E_bulk + mu_Si + q E_VBM, with mu_Si = E_bulk / N for elemental Si
    mu = -110.0 / 16
    assert res.formation_energies_vbm["v_Si +1"] == pytest.approx(-99.5 + 110.0 + mu + vbm)
    assert res.formation_energies_vbm["v_Si -1"] == pytest.approx(-99.0 + 110.0 + mu - vbm)
    assert any("elemental host" in n for n in res.notes)
    # user chemical potentials replace that reference and leave the CTLs unchanged
    user = compute_levels(_entries(generation, energies), generation.bulk_supercell, -110.0, vbm, gap,
                          correction="none", chemical_potentials={"Si": -7.0})
    assert user.formation_energies_vbm["v_Si +0"] == pytest.approx(-100.0 + 110.0 - 7.0)
    assert [t.level for t in user.transition_levels] == pytest.approx([t.level for t in res.transition_levels])
    assert res.correction_scheme == "none" and Path(res.plot).stat().st_size > 10_000


def test_auto_correction_is_image_charge_and_shifts_levels(generation):
    energies = {1: -99.5, 0: -100.0, -1: -99.0}
    plain = compute_levels(_entries(generation, energies), generation.bulk_supercell, -110.0, 0.0, 1.1,
                           correction="none")
    corr = compute_levels(_entries(generation, energies), generation.bulk_supercell, -110.0, 0.0, 1.1,
                          correction="auto", dielectric=11.7)
    assert corr.correction_scheme == "image_charge"
    assert corr.correction_reason.startswith("auto → image_charge: no electrostatic potential for bulk")
    assert corr.correction_reason in corr.notes
    assert {d.scheme for d in corr.correction_details.values()} == {"image_charge"}
    c1 = corr.corrections["v_Si +1"]
    assert c1 > 0 and corr.corrections["v_Si +0"] == 0.0
    # eps(+1/0) moves down by the q=+1 correction (E_f(+1) rises by c1)
    lv = {(t.q_from, t.q_to): t.level for t in corr.transition_levels}
    lp = {(t.q_from, t.q_to): t.level for t in plain.transition_levels}
    assert lv[(1, 0)] == pytest.approx(lp[(1, 0)] - c1)


@pytest.mark.parametrize("asked", ["efnv", "eFNV", "FNV"])
def test_efnv_fnv_without_potentials_is_a_clear_error(generation, asked):
    """Asking for eFNV/FNV when the calculations carry no potentials names the field and what is missing (the
    neutral entry needs none)."""
    with pytest.raises(ValueError, match=rf"levels.correction: '{asked.lower()}' needs the .* missing for: bulk, "
                                         r"v_Si -1, v_Si \+1\."):
        compute_levels(_entries(generation, {1: 0.0, 0: 0.0, -1: 0.0}), generation.bulk_supercell, 0.0, 0.0, 1.0,
                       correction=asked, dielectric=11.7)
