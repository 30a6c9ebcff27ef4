"""The committed generated code (moco_retrieval/api/v1/*.py[i]) must equal a fresh `make proto`."""

from __future__ import annotations

from pathlib import Path

from scripts.gen_proto import PACKAGE, REPO, generate


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    fresh = generate(tmp_path)
    assert fresh, "protoc generated nothing"
    stale = []
    for path in fresh:
        rel = path.relative_to(tmp_path)
        committed = REPO / rel
        if not committed.exists() or committed.read_bytes() != path.read_bytes():
            stale.append(str(rel))
    committed_files = {p.relative_to(REPO) for p in (REPO / PACKAGE).rglob("*") if p.suffix in (".py", ".pyi")}
    extra = committed_files - {p.relative_to(tmp_path) for p in fresh}
    assert not stale and not extra, (
        f"generated code is stale (run `make proto`): differs {stale}, extra {sorted(map(str, extra))}"
    )


def test_service_has_the_contract_methods() -> None:
    from moco_retrieval.api.v1 import retrieval_pb2

    methods = set(retrieval_pb2.DESCRIPTOR.services_by_name["Retrieval"].methods_by_name)
    assert methods == {
        "Embed",
        "Upsert",
        "Delete",
        "SetLabels",
        "Get",
        "Search",
        "Classify",
        "SearchBatch",
        "ClassifyBatch",
        "LabelCorpus",
        "Info",
        "Suggest",
        "Duplicates",
        "ListLabels",
        "SwitchModel",
    }
