"""The API surface the audit reports for a client with API access only (advface.audit.api_surface)."""

from __future__ import annotations

from advface.api.v1 import advface_pb2 as pb
from advface.audit.api_surface import api_exposure, scalar_score_fields, vector_fields


def test_vector_and_score_fields_are_found_through_nested_messages() -> None:
    assert vector_fields(pb.ProtectResponse.DESCRIPTOR) == ["embeddings.values"]
    assert vector_fields(pb.EnrollRequest.DESCRIPTOR) != []  # a request carrying an embedding
    assert scalar_score_fields(pb.IdentifyResponse.DESCRIPTOR) == ["matches.score"]
    assert vector_fields(pb.Subject.DESCRIPTOR) == []


def test_no_rpc_returns_a_stored_template() -> None:
    api = api_exposure()
    assert set(api["rpcs"]) >= {"Enroll", "Verify", "Identify", "GetSubject", "ListSubjects", "Protect"}
    assert api["stored_vectors"] == []
    assert api["caller_input_vectors"] == ["Protect"]
    assert set(api["score_rpcs"]) == {"Verify", "Identify"}
