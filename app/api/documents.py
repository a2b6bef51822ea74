"""Routes for documents: ingest (JSON or .txt/.md upload) and listing with adaptation state."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from app.db.jobs import DocumentState
from app.deps import IngestServiceDep, OperatorDep, SettingsDep
from app.errors import APIError, InvalidRequest, PayloadTooLarge
from app.protocol.jobs import DocumentList, DocumentPublic, DocumentsCreate, IngestResponse
from app.services.ingest import DocumentInput, DocumentView

router = APIRouter(prefix="/v1/documents", tags=["documents"])

UPLOAD_SUFFIXES = (".txt", ".md")
_OPENAPI_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "description": "{namespace, documents: [{text, title?, metadata?, "
                    "probes?: [{question, answer}]}], force?}",
                }
            },
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["namespace", "file"],
                    "properties": {
                        "namespace": {"type": "string"},
                        "force": {"type": "boolean"},
                        "file": {"type": "array", "items": {"type": "string", "format": "binary"}},
                    },
                }
            },
        },
    }
}


class UnsupportedMediaType(APIError):
    status_code = 415
    type = "invalid_request_error"
    code = "unsupported_media_type"


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing more than `limit` bytes before reading them all."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"Request body is {declared} bytes; the limit is {limit}.")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"Request body exceeds the limit of {limit} bytes.")
        chunks.append(chunk)
    return b"".join(chunks)


def _from_json(body: bytes) -> tuple[str, list[DocumentInput], bool]:
    try:
        req = DocumentsCreate.model_validate_json(body)
    except ValidationError as e:
        errors = [{**err, "loc": ("body", *err["loc"])} for err in e.errors()]
        raise RequestValidationError(errors) from e
    return req.namespace, [d.to_input(i) for i, d in enumerate(req.documents)], req.force


def _decode_upload(name: str, data: bytes, index: int) -> str:
    if not name.lower().endswith(UPLOAD_SUFFIXES):
        raise InvalidRequest(
            f"File '{name}' is not a .txt or .md file.",
            param=f"file.{index}",
            code="unsupported_file_type",
        )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InvalidRequest(
            f"File '{name}' is not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}).",
            param=f"file.{index}",
            code="invalid_encoding",
        ) from e


async def _from_multipart(
    request: Request, body: bytes, max_files: int
) -> tuple[str, list[DocumentInput], bool]:
    async def stream() -> AsyncGenerator[bytes, None]:
        yield body

    # Files count against the request limits: the whole body was already bounded.
    parser = MultiPartParser(
        request.headers, stream(), max_files=max_files + 1, max_part_size=len(body) + 1
    )
    try:
        form = await parser.parse()
    except MultiPartException as e:
        raise InvalidRequest(
            f"Malformed multipart body: {e.message}", code="invalid_multipart"
        ) from e
    namespace = form.get("namespace")
    if not isinstance(namespace, str):
        raise InvalidRequest("Field 'namespace' is required.", param="namespace")
    force = str(form.get("force", "false")).strip().lower() in {"1", "true", "yes", "on"}
    uploads = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
    docs = []
    for i, upload in enumerate(uploads):
        name = upload.filename or f"file-{i}"
        text = _decode_upload(name, await upload.read(), i)
        docs.append(
            DocumentInput(text=text, param=f"file.{i}", title=name, metadata={"filename": name})
        )
    await form.close()
    return namespace, docs, force


@router.post(
    "",
    response_model=IngestResponse,
    status_code=202,
    openapi_extra=_OPENAPI_BODY,
    responses={200: {"model": IngestResponse, "description": "all documents were duplicates"}},
)
async def create_documents(
    request: Request,
    response: Response,
    principal: OperatorDep,
    ingest: IngestServiceDep,
    settings: SettingsDep,
) -> IngestResponse:
    """Store documents and queue their adaptation (202 with the job id)."""
    limits = settings.pipeline
    body = await _read_body(request, limits.max_body_bytes)
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        parsed = await _from_multipart(request, body, limits.max_documents_per_request)
    elif ctype in ("application/json", ""):
        parsed = _from_json(body)
    else:
        raise UnsupportedMediaType("Send application/json or multipart/form-data.")
    namespace, docs, force = parsed
    result = await ingest.ingest(
        namespace=namespace, documents=docs, actor=principal.name, force=force
    )
    if not result.accepted:
        response.status_code = 200
    return IngestResponse.of(result)


def _public(view: DocumentView) -> DocumentPublic:
    doc = view.document
    return DocumentPublic(
        id=doc.id,
        namespace=view.namespace,
        title=doc.title,
        sha256=doc.sha256,
        bytes=len(doc.text.encode()),
        state=doc.state,
        job_id=doc.job_id,
        job_status=view.job_status,
        probes=len(doc.probes or []),
        metadata=doc.metadata_ or {},
        created_at=int(doc.created_at.timestamp()),
        created_by=doc.created_by,
    )


@router.get("", response_model=DocumentList)
async def list_documents(
    _: OperatorDep,
    ingest: IngestServiceDep,
    namespace: str | None = None,
    state: DocumentState | None = None,
    after: Annotated[str | None, Query(description="last id of the previous page")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> DocumentList:
    """List documents, newest first, with their adaptation state."""
    page = await ingest.list_documents(namespace=namespace, state=state, after=after, limit=limit)
    return DocumentList(data=[_public(v) for v in page.data], has_more=page.has_more)
