"""Endpoints, their deployments and traffic (the entities and rules are lmops/deploy/endpoints.py).

Every change is one transaction that locks the endpoint's row (SQLite: BEGIN IMMEDIATE; PostgreSQL:
SELECT ... FOR UPDATE), checks the rules on the result and adds one to the endpoint's revision, then an
audit entry saying who changed what and why. Servers poll `revision` to learn of changes cheaply.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, ForeignKey, Integer, Text, delete, select
from sqlalchemy.orm import Mapped, mapped_column, sessionmaker

from lmops.deploy.endpoints import Deployment, Endpoint, check_name, check_traffic, with_share
from lmops.errors import LmopsError
from lmops.store.audit import AuditLog
from lmops.store.db import Base, UTCDateTime, utcnow


class EndpointRow(Base):
    __tablename__ = "endpoints"
    name: Mapped[str] = mapped_column(primary_key=True)
    description: Mapped[str] = mapped_column(Text)
    traffic: Mapped[dict[str, int]] = mapped_column(JSON)
    mirror: Mapped[dict[str, int]] = mapped_column(JSON)
    revision: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    created_by: Mapped[str]
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


class DeploymentRow(Base):
    __tablename__ = "deployments"
    endpoint: Mapped[str] = mapped_column(ForeignKey("endpoints.name", ondelete="CASCADE"), primary_key=True)
    name: Mapped[str] = mapped_column(primary_key=True)
    model_ref: Mapped[str]
    model_name: Mapped[str]
    model_version: Mapped[str]
    model_uri: Mapped[str]
    runtime: Mapped[str | None]
    max_batch: Mapped[int | None]
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    created_by: Mapped[str]


def _deployment(row: DeploymentRow) -> Deployment:
    return Deployment(row.endpoint, row.name, row.model_ref, row.model_name, row.model_version, row.model_uri,
                      row.runtime, row.max_batch, row.created_at, row.created_by)


def _endpoint(row: EndpointRow, deployments: list[DeploymentRow]) -> Endpoint:
    return Endpoint(row.name, row.description, dict(row.traffic), dict(row.mirror),
                    {d.name: _deployment(d) for d in sorted(deployments, key=lambda d: d.name)},
                    row.revision, row.created_at, row.created_by, row.updated_at)


class Endpoints:
    def __init__(self, sessions: sessionmaker, audit: AuditLog):
        self._sessions, self._audit = sessions, audit

    # ------------------------------------------------------------------------- reading

    def find(self, name: str) -> Endpoint | None:
        with self._sessions.begin() as s:
            row = s.get(EndpointRow, name)
            return None if row is None else _endpoint(row, self._deployment_rows(s, name))

    def get(self, name: str) -> Endpoint:
        if (ep := self.find(name)) is None:
            names = ", ".join(e.name for e in self.list()) or "none yet; create one with `lmops endpoint create NAME`"
            raise LmopsError(f"no endpoint '{name}' (endpoints: {names})")
        return ep

    def list(self) -> list[Endpoint]:
        with self._sessions.begin() as s:
            rows = list(s.scalars(select(EndpointRow).order_by(EndpointRow.name)))
            deps = list(s.scalars(select(DeploymentRow)))
            return [_endpoint(r, [d for d in deps if d.endpoint == r.name]) for r in rows]

    def revision(self, name: str) -> int | None:
        """The endpoint's revision (None: it is gone): one indexed read, what a server polls."""
        with self._sessions.begin() as s:
            return s.scalar(select(EndpointRow.revision).where(EndpointRow.name == name))

    # ------------------------------------------------------------------------- changing

    def create(self, name: str, actor: str, description: str = "", reason: str | None = None) -> Endpoint:
        check_name(name, "endpoint")
        now = utcnow()
        with self._sessions.begin() as s:
            if s.get(EndpointRow, name) is not None:
                raise LmopsError(f"endpoint '{name}' exists already; `lmops endpoint show {name}` shows it")
            s.add(EndpointRow(name=name, description=description, traffic={}, mirror={}, revision=1,
                              created_at=now, created_by=actor, updated_at=now))
        self._audit.append(actor, "endpoint.created", f"endpoint:{name}", {"description": description}, reason)
        return self.get(name)

    def delete(self, name: str, actor: str, reason: str | None = None) -> Endpoint:
        with self._sessions.begin() as s:
            row = self._locked(s, name)
            ep = _endpoint(row, self._deployment_rows(s, name))
            s.execute(delete(DeploymentRow).where(DeploymentRow.endpoint == name))
            s.delete(row)
        self._audit.append(actor, "endpoint.deleted", f"endpoint:{name}",
                           {"deployments": {d.name: d.model_uri for d in ep.deployments.values()},
                            "traffic": ep.traffic}, reason)
        return ep

    def deploy(self, deployment: Deployment, actor: str, traffic: int | None = None,
               reason: str | None = None) -> Endpoint:
        """Add a deployment, or replace one of that name (its model or settings). traffic: its share of
        live traffic, taken from the others in proportion; None: 100 for the first deployment, else what
        it had (0 when new), so deploying never moves traffic unless asked."""
        check_name(deployment.name, "deployment")
        now = utcnow()
        with self._sessions.begin() as s:
            row = self._locked(s, deployment.endpoint)
            existing = s.get(DeploymentRow, (deployment.endpoint, deployment.name))
            first = not self._deployment_rows(s, deployment.endpoint)
            old_traffic = {**dict(row.traffic), deployment.name: dict(row.traffic).get(deployment.name, 0)}
            share = 100 if traffic is None and first else traffic
            new_traffic = old_traffic if share is None else with_share(old_traffic, deployment.name, share)
            mirror = dict(row.mirror)
            names = {d.name for d in self._deployment_rows(s, deployment.endpoint)} | {deployment.name}
            check_traffic(names, new_traffic, mirror)
            if existing is not None:
                s.delete(existing)
                s.flush()
            s.add(DeploymentRow(endpoint=deployment.endpoint, name=deployment.name, model_ref=deployment.model_ref,
                                model_name=deployment.model_name, model_version=deployment.model_version,
                                model_uri=deployment.model_uri, runtime=deployment.runtime,
                                max_batch=deployment.max_batch, created_at=now, created_by=actor))
            self._changed(row, now, traffic=new_traffic)
        details: dict[str, Any] = {"deployment": deployment.name, "model": deployment.model_ref,
                                   "model_name": deployment.model_name, "version": deployment.model_version,
                                   "uri": deployment.model_uri, "runtime": deployment.runtime,
                                   "max_batch": deployment.max_batch, "traffic": new_traffic,
                                   "replaced": None if existing is None else existing.model_uri}
        self._audit.append(actor, "endpoint.deployed", f"endpoint:{deployment.endpoint}", details, reason)
        return self.get(deployment.endpoint)

    def undeploy(self, endpoint: str, name: str, actor: str, reason: str | None = None) -> Endpoint:
        """Remove a deployment that takes no live traffic (move its traffic first); its mirror goes too."""
        with self._sessions.begin() as s:
            row = self._locked(s, endpoint)
            existing = s.get(DeploymentRow, (endpoint, name))
            if existing is None:
                have = ", ".join(d.name for d in self._deployment_rows(s, endpoint)) or "none"
                raise LmopsError(f"endpoint '{endpoint}' has no deployment '{name}' (deployments: {have})")
            weight = dict(row.traffic).get(name, 0)
            if weight == 100:
                raise LmopsError(f"{name} takes all of {endpoint}'s traffic; deploy another model and move the "
                                 f"traffic to it first (lmops traffic set {endpoint} OTHER=100)")
            if weight > 0:
                raise LmopsError(f"{name} takes {weight}% of {endpoint}'s traffic; move it to the other "
                                 f"deployments first (lmops traffic set {endpoint} ...)")
            s.delete(existing)
            traffic = {d: w for d, w in dict(row.traffic).items() if d != name}
            mirror = {d: w for d, w in dict(row.mirror).items() if d != name}
            self._changed(row, utcnow(), traffic=traffic, mirror=mirror)
        self._audit.append(actor, "endpoint.undeployed", f"endpoint:{endpoint}",
                           {"deployment": name, "uri": existing.model_uri, "version": existing.model_version}, reason)
        return self.get(endpoint)

    def set_traffic(self, endpoint: str, actor: str, traffic: dict[str, int] | None = None,
                    mirror: dict[str, int] | None = None, reason: str | None = None,
                    action: str = "endpoint.traffic") -> Endpoint:
        """Set live traffic and/or mirror traffic (None: unchanged). A deployment not named in `traffic`
        gets 0 (so `blue=100` sends everything to blue); likewise for `mirror`."""
        with self._sessions.begin() as s:
            row = self._locked(s, endpoint)
            names = [d.name for d in self._deployment_rows(s, endpoint)]
            new_traffic = dict(row.traffic) if traffic is None else {d: 0 for d in names} | traffic
            new_mirror = dict(row.mirror) if mirror is None else {d: w for d, w in mirror.items() if w > 0}
            if traffic is not None and mirror is None:  # a deployment given live traffic stops being mirrored
                new_mirror = {d: w for d, w in new_mirror.items() if new_traffic.get(d, 0) == 0}
            check_traffic(names, new_traffic, new_mirror)
            before = {"traffic": dict(row.traffic), "mirror": dict(row.mirror)}
            self._changed(row, utcnow(), traffic=new_traffic, mirror=new_mirror)
        self._audit.append(actor, action, f"endpoint:{endpoint}",
                           {"traffic": new_traffic, "mirror": new_mirror, "before": before}, reason)
        return self.get(endpoint)

    # ------------------------------------------------------------------------- helpers

    @staticmethod
    def _locked(s: Any, name: str) -> EndpointRow:
        row = s.scalars(select(EndpointRow).where(EndpointRow.name == name).with_for_update()).first()
        if row is None:
            raise LmopsError(f"no endpoint '{name}'; create it with `lmops endpoint create {name}`")
        return row

    @staticmethod
    def _deployment_rows(s: Any, endpoint: str) -> list[DeploymentRow]:
        return list(s.scalars(select(DeploymentRow).where(DeploymentRow.endpoint == endpoint)
                              .order_by(DeploymentRow.name)))

    @staticmethod
    def _changed(row: EndpointRow, now: datetime, **fields: Any) -> None:
        for k, v in fields.items():
            setattr(row, k, v)
        row.revision += 1
        row.updated_at = now

