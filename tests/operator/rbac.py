"""Match API requests (as kmock logged them) against RBAC PolicyRules."""

from __future__ import annotations

from typing import Any

import kmock


def verb(request: kmock.Request) -> str:
    method = str(request.method.value).upper()
    if method == "GET":
        if request.params.get("watch") in ("true", "1"):
            return "watch"
        return "get" if request.name else "list"
    return {"POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}.get(method, method.lower())


def attributes(request: kmock.Request) -> tuple[str, str, str] | None:
    """(apiGroup, resource[/subresource], verb), or None for discovery and other non-resource URLs."""
    path = request.url.path.rstrip("/")
    if path.rstrip("/") == "/api/v1/namespaces":
        return "", "namespaces", verb(request)
    resource = request.resource
    if resource is None or resource.plural is None:
        return None
    plural = f"{resource.plural}/{request.subresource}" if request.subresource else str(resource.plural)
    return str(resource.group), plural, verb(request)


def allowed(rules: list[dict[str, Any]], group: str, resource: str, verb_: str) -> bool:
    return any(
        (group in rule.get("apiGroups", []) or "*" in rule.get("apiGroups", []))
        and (resource in rule.get("resources", []) or "*" in rule.get("resources", []))
        and (verb_ in rule.get("verbs", []) or "*" in rule.get("verbs", []))
        for rule in rules
    )
