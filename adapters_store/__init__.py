"""The adapter registry: SQL models, content-addressed blobs, versions, aliases, change events."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from adapters_store.blobs import Blob, BlobCorrupt, BlobError, BlobMissing, BlobStore
    from adapters_store.events import (
        CHANNEL,
        ChangeEvent,
        ChangePublisher,
        ChangeSubscriber,
        RedisChangePublisher,
    )
    from adapters_store.models import (
        ACTIVE_STATUSES,
        TERMINAL_STATUSES,
        AdapterStatus,
        AdapterVersion,
        Alias,
        AuditEvent,
        Namespace,
        NamespaceSettings,
    )
    from adapters_store.registry import AdapterRegistry, BeforeMove, ResolvedVersion
    from adapters_store.validation import (
        InvalidAdapter,
        PeftInfo,
        validate_peft_dir,
        validate_upload_names,
    )

# Lazy re-exports: `import adapters_store.models` (Alembic) must not pull in Redis or FastAPI.
_EXPORTS = {
    "adapters_store.blobs": ("Blob", "BlobCorrupt", "BlobError", "BlobMissing", "BlobStore"),
    "adapters_store.events": (
        "CHANNEL",
        "ChangeEvent",
        "ChangePublisher",
        "ChangeSubscriber",
        "RedisChangePublisher",
    ),
    "adapters_store.models": (
        "ACTIVE_STATUSES",
        "TERMINAL_STATUSES",
        "AdapterStatus",
        "AdapterVersion",
        "Alias",
        "AuditEvent",
        "Namespace",
        "NamespaceSettings",
    ),
    "adapters_store.registry": ("AdapterRegistry", "BeforeMove", "ResolvedVersion"),
    "adapters_store.validation": (
        "InvalidAdapter",
        "PeftInfo",
        "validate_peft_dir",
        "validate_upload_names",
    ),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = [
    "ACTIVE_STATUSES",
    "CHANNEL",
    "TERMINAL_STATUSES",
    "AdapterRegistry",
    "AdapterStatus",
    "AdapterVersion",
    "Alias",
    "AuditEvent",
    "BeforeMove",
    "Blob",
    "BlobCorrupt",
    "BlobError",
    "BlobMissing",
    "BlobStore",
    "ChangeEvent",
    "ChangePublisher",
    "ChangeSubscriber",
    "InvalidAdapter",
    "Namespace",
    "NamespaceSettings",
    "PeftInfo",
    "RedisChangePublisher",
    "ResolvedVersion",
    "validate_peft_dir",
    "validate_upload_names",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'adapters_store' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
