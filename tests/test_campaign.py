"""Campaign model: valid campaigns, the bad-input table (exact messages), YAML handling, shipped workflows."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pymatgen.core import Structure

from defectflow.campaign import Campaign, CampaignError
from defectflow.engines import AseSettings, CP2KSettings, QESettings

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / "workflows").glob("*.yaml"))
BASE = {"name": "t", "host": {"structure": "Si.cif"}}


def test_minimal_campaign_gets_documented_defaults():
    c = Campaign.from_dict(BASE)
    assert c.charges == "auto"
    assert c.defects.include == ["vacancies"]
    assert isinstance(c.fidelities.low, CP2KSettings) and c.fidelities.low.xc == "PBE"
    assert isinstance(c.fidelities.high, QESettings) and c.fidelities.high.xc == "HSE06"
    assert c.distortions.distortion_increment == 0.1 and c.distortions.dimer
    assert c.mlip.multi_fidelity == "finetune" and c.mlip.charge_embedding
    assert c.execution.store == "embedded"


def test_engine_union_picks_the_settings_class():
    c = Campaign.from_dict({**BASE, "fidelities": {
        "low": {"engine": "ase", "calculator": "tblite.ase.TBLite", "kwargs": {"method": "GFN1-xTB"}},
        "high": {"engine": "qe", "xc": "HSE06", "ecutwfc": 25}}})
    assert isinstance(c.fidelities.low, AseSettings)
    assert c.fidelities.high.ecutwfc == 25.0


def test_charges_forms():
    assert Campaign.from_dict({**BASE, "charges": [-1, 0, 1]}).charges_for("v_Si") == [-1, 0, 1]
    c = Campaign.from_dict({**BASE, "charges": {"v_Sb": [-3, -2, -1, 0, 1], "v_Se": "auto"}})
    assert c.charges_for("v_Sb") == [-3, -2, -1, 0, 1]
    assert c.charges_for("v_Sb_1") == [-3, -2, -1, 0, 1]  # doped site suffix
    assert c.charges_for("v_Se") is None
    assert c.charges_for("Sb_Se") is None


def test_settings_digest_ignores_parallelisation_only():
    a = QESettings(xc="HSE06", mpi_procs=2)
    b = QESettings(xc="HSE06", mpi_procs=8)
    c = QESettings(xc="HSE06", ecutwfc=40)
    assert a.digest() == b.digest()
    assert a.digest() != c.digest()


BAD = [
    ({}, ["name: required field is missing", "host: required field is missing"]),
    ({**BASE, "fidelities": {"low": {"engine": "gaussian"}}},
     ["fidelities.low.engine: expected one of 'qe', 'cp2k', 'vasp', 'ase', got 'gaussian'"]),
    ({**BASE, "fidelities": {"low": {"xc": "PBE"}}},
     ["fidelities.low.engine: required field 'engine' is missing (one of 'qe', 'cp2k', 'vasp', 'ase')"]),
    ({**BASE, "fidelities": {"high": {"engine": "qe", "ecutwfc": -3}}},
     ["fidelities.high.ecutwfc: expected a value greater than 0, got -3"]),
    ({**BASE, "fidelities": {"high": {"engine": "qe", "xc": "B3LYP"}}},
     ["fidelities.high.xc: expected 'PBE', 'LDA', 'HSE06' or 'PBE0', got 'B3LYP'"]),
    ({**BASE, "charges": [0, 99]},
     ["charges: charge 99 outside ±10 (the range the MACE charge embedding covers)"]),
    ({**BASE, "charges": "sometimes"},
     ["charges: expected 'auto', a list of integer charges, or {defect name: list or 'auto'}"]),
    ({**BASE, "charges": {"vacancy_Si": [0]}},
     ["charges: 'vacancy_Si' is not a doped defect name (like v_Si, Si_i, Se_Sb)"]),
    ({**BASE, "distortions": {"bond_distortions": [-30, 30]}},
     ["distortions.bond_distortions: expected fractions between -1 and 1 (e.g. -0.3 for -30 %), got -30.0"]),
    ({**BASE, "defects": {"include": ["vacancy"]}},
     ["defects.include: 'vacancy' is neither a doped defect name (like v_Si, Si_i, Se_Sb) nor a kind "
      "(vacancies, antisites, substitutions, interstitials, all)"]),
    ({**BASE, "defects": {"extrinsic": ["Xx"]}}, ["defects.extrinsic: 'Xx' is not a chemical element symbol"]),
    ({**BASE, "selection": {"budget": 0}}, ["selection.budget: expected a value greater than or equal to 1, got 0"]),
    ({**BASE, "selection": {"strategy": "random"}},
     ["selection.strategy: expected 'minima', 'fps' or 'stratified', got 'random'"]),
    ({**BASE, "execution": {"store": "postgres://x"}},
     ["execution.store: expected 'embedded', 'mongodb' or a MongoDB URI starting with mongodb://, got 'postgres://x'"]),
    ({**BASE, "execution": {"resources": {"relax_lf": {"corez": 2}}}},
     ["execution.resources.relax_lf.corez: unknown field; expected one of: cores, walltime, gpu, worker, queue"]),
    ({**BASE, "name": "my campaign"},
     ["name: expected letters, digits, '_', '.' or '-' (no spaces), got 'my campaign'"]),
    ({**BASE, "levels": {"dielectric": -1}}, ["levels.dielectric: expected a positive dielectric constant, got -1.0"]),
    ({**BASE, "selection": {"per_group_min": 3, "per_group_max": 2}},
     ["selection.per_group_max: must be ≥ selection.per_group_min (2 < 3)"]),
    ({**BASE, "fidelities": {"high": {"engine": "ase", "calculator": "TBLite"}}},
     ["fidelities.high.calculator: expected an import path like 'tblite.ase.TBLite', got 'TBLite'"]),
]


@pytest.mark.parametrize("data, expected", BAD, ids=[e[0].split(":")[0] for _, e in BAD])
def test_bad_input_gives_field_named_messages(data, expected):
    with pytest.raises(CampaignError) as info:
        Campaign.from_dict(data, source="c.yaml")
    assert info.value.problems == expected
    assert str(info.value) == "\n".join("c.yaml: " + p for p in expected)


def test_unknown_key_lists_valid_keys():
    with pytest.raises(CampaignError) as info:
        Campaign.from_dict({**BASE, "fidelities": {"high": {"engine": "qe", "ecutwfx": 30}}})
    (msg,) = info.value.problems
    assert msg.startswith("fidelities.high.ecutwfx: unknown field; expected one of: engine, xc, spin, ecutwfc")


def test_yaml_syntax_error_names_the_line(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("name: x\nhost:\n  structure: [unclosed\n")
    with pytest.raises(CampaignError) as info:
        Campaign.from_yaml(f)
    (msg,) = info.value.problems
    assert msg.startswith("line ") and "YAML syntax error" in msg


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "e.yaml").write_text("")
    with pytest.raises(CampaignError, match="the file is empty"):
        Campaign.from_yaml(tmp_path / "e.yaml")
    with pytest.raises(CampaignError, match="campaign file not found"):
        Campaign.from_yaml(tmp_path / "nope.yaml")


def test_host_structure_from_file_relative_to_campaign_and_from_python(tmp_path):
    s = Structure.from_file(ROOT / "workflows" / "structures" / "Si.POSCAR")
    (tmp_path / "sub").mkdir()
    s.to(filename=str(tmp_path / "sub" / "host.cif"))
    (tmp_path / "sub" / "c.yaml").write_text(yaml.safe_dump({"name": "x", "host": {"structure": "host.cif"}}))
    c = Campaign.from_yaml(tmp_path / "sub" / "c.yaml")
    assert c.host_structure().composition.reduced_formula == "Si"
    c2 = Campaign(name="py", host={"structure": s})
    assert c2.host_structure() is s
    # and round-trips through YAML with the structure embedded
    c3 = Campaign.from_dict(yaml.safe_load(c2.to_yaml()))
    assert c3.host_structure() == s


def test_missing_host_file_is_named(tmp_path):
    (tmp_path / "c.yaml").write_text("name: x\nhost: {structure: nothere.cif}\n")
    c = Campaign.from_yaml(tmp_path / "c.yaml")
    with pytest.raises(CampaignError, match=r"host.structure: file not found: .*nothere.cif"):
        c.host_structure()


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.name for p in WORKFLOWS])
def test_shipped_workflows_validate(path):
    c = Campaign.from_yaml(path)
    assert c.host_structure().is_ordered
    assert c.fidelities.low.engine and c.fidelities.high.engine


def test_workflows_exist():
    assert {p.name for p in WORKFLOWS} >= {"quickstart.yaml", "si_vacancy_hse06.yaml"}


def test_docs_reference_is_up_to_date():
    from defectflow.schema_doc import campaign_reference_markdown

    committed = (ROOT / "docs" / "campaign-reference.md").read_text()
    assert committed.strip() == campaign_reference_markdown().strip(), (
        "docs/campaign-reference.md is stale: run `defectflow schema --markdown > docs/campaign-reference.md`"
    )
