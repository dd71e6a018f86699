"""A database role for the agent's process: it captures, and nothing more (PostgreSQL).

Signed labels (`honed.store.signing`) make whatever is written without the key count for nothing,
but code holding the store's credentials could still *delete*: the verdict that failed its run (its
pass counts again), the newest audit of a verifier (an older, better one counts again), a run's
claim (the worker judges it again), a held-out run (its task trains). A signature cannot tell a row
that was never written from one deleted. So the agent's process gets a role of its own: it reads
what capture reads (a resumed run continues its stored trajectory; a served model follows the
registry), inserts runs and their steps, and updates only a run paused at an interrupt (row-level
security: a finished run, its split and its output, are out of its reach); it can write no verdict,
policy, audit, claim, training or registry row, and delete nothing. SQLite has no roles: one file,
one trust domain.

    store.grant_capture("agent")   # or: honed init --capture-role agent
    # the agent's process: HONED_STORE=postgresql+psycopg://agent:...@db/honed
"""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import Engine, text

from honed.store.select import EVALUATION_SPLITS
from honed.trajectory import INTERRUPTED

# What the capture path writes (`TrajectoryStore.save_records`), and the tables it only reads.
WRITTEN = ("trajectories", "steps")
READ = ("alembic_version", "model_versions", "model_live", "model_events")
_EVERYONE = "honed_everyone"  # permissive: row-level security changes nothing for other roles


def grant_capture(engine: Engine, role: str) -> list[str]:
    """Give an existing PostgreSQL `role` exactly what capture needs in the store's schema (and take
    back anything more); returns the statements run. Idempotent."""
    check_capture_role(engine, role)
    quote = engine.dialect.identifier_preparer.quote
    who = quote(role)
    with engine.begin() as conn:
        schema = conn.execute(text("SELECT current_schema()")).scalar()
        tables = [
            t
            for (t,) in conn.execute(
                text("SELECT tablename FROM pg_tables WHERE schemaname = :s"), {"s": schema}
            )
        ]
        acting = _acts_as(conn, role, schema)
        if acting:  # before anything runs: revoking from the owner took its own rights away
            raise ValueError(
                f"{role!r} owns the store's tables or is a member of another role ({', '.join(acting)}; "
                "it can SET ROLE to a member's): give the agent's process a role of its own, a member of none"
            )
        paused = f"honed_capture_{role}"[:63]
        existing = {
            name
            for (name,) in conn.execute(
                text(
                    "SELECT policyname FROM pg_policies WHERE schemaname = :s AND tablename = 'trajectories'"
                ),
                {"s": schema},
            )
        }
        statements = [
            f"GRANT USAGE ON SCHEMA {quote(schema)} TO {who}",
            *(f"REVOKE ALL ON {quote(t)} FROM {who}" for t in tables),
            *(f"GRANT SELECT ON {quote(t)} TO {who}" for t in READ if t in tables),
            f"GRANT SELECT, INSERT ON {', '.join(WRITTEN)} TO {who}",
            f"GRANT UPDATE ON trajectories TO {who}",
            "ALTER TABLE trajectories ENABLE ROW LEVEL SECURITY",
        ]
        if _EVERYONE not in existing:
            statements.append(
                f"CREATE POLICY {_EVERYONE} ON trajectories AS PERMISSIVE FOR ALL TO PUBLIC USING (true) WITH CHECK (true)"
            )
        if paused not in existing:
            # Checked on the row before the update: a paused run may be resumed (and finish).
            statements.append(
                f"CREATE POLICY {quote(paused)} ON trajectories AS RESTRICTIVE FOR UPDATE TO {who} "
                f"USING (status = '{INTERRUPTED}') WITH CHECK (true)"
            )
        # What a paused run keeps whoever resumes it: its id, agent, task id, conversation and
        # the marks that hold it out of training (a QA pass, session 26: as the role, a paused gate
        # run was moved to `train`, and trained; session 27: so were runs in the splits the
        # regex did not name, `ood`, `golden`, a full-width `ｈｅｌｄｏｕｔ`, and runs whose
        # `held_out_by` was taken out of their metadata). SQL cannot know every name Python holds
        # out (`evaluation_split`, a caller's own), so the rule is the other way round: a split
        # that is not plainly training's stays as it is, unless it becomes a plain evaluation
        # split (a resume labelled held out); and so does the task of a run held out.
        guard = f"honed_capture_guard_{role}"[:63]
        statements.append(f"""CREATE OR REPLACE FUNCTION {quote(guard)}() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $g$
DECLARE
  old_meta jsonb := coalesce(OLD.metadata::jsonb, '{{}}'::jsonb);
  new_meta jsonb := coalesce(NEW.metadata::jsonb, '{{}}'::jsonb);
  held boolean;
  mark text;
BEGIN
  held := old_meta ? 'held_out_by' OR (OLD.split IS NOT NULL
    AND NOT (OLD.split ~ '^[A-Za-z _.-]*$' AND lower(regexp_replace(OLD.split, '[^A-Za-z]', '', 'g')) IN ('train', 'training')));
  IF NEW.id IS DISTINCT FROM OLD.id OR NEW.agent IS DISTINCT FROM OLD.agent
     OR NEW.task_id IS DISTINCT FROM OLD.task_id
     OR NEW.messages::jsonb IS DISTINCT FROM OLD.messages::jsonb
     OR NEW.tools::jsonb IS DISTINCT FROM OLD.tools::jsonb THEN
    RAISE EXCEPTION 'honed: a capture role may not change a paused run''s id, agent, task id or conversation';
  END IF;
  IF NEW.created_at IS DISTINCT FROM OLD.created_at THEN
    RAISE EXCEPTION 'honed: a capture role may not change when a run was stored';
  END IF;
  IF held AND (new_meta - '{{output_types,nested_task_ids}}'::text[]) IS DISTINCT FROM (old_meta - '{{output_types,nested_task_ids}}'::text[]) THEN
    -- Not even a key added: `match`, `tolerance`, `schema` change how its task is judged (a QA
    -- pass, session 27: `tolerance: 1e18` passed any answer at the gate).
    RAISE EXCEPTION 'honed: a capture role may not change a held-out run''s metadata (what its verifiers read)';
  END IF;
  IF NEW.split IS DISTINCT FROM OLD.split OR NEW.task::jsonb IS DISTINCT FROM OLD.task::jsonb THEN
    -- A run moved into a split, or asking anew, is stored now as far as the gate's tasks go:
    -- an early paused run moved into `heldout` with a new task redefined an operator's gate task.
    NEW.created_at := now();
  END IF;
  IF held AND (NEW.task::jsonb IS DISTINCT FROM OLD.task::jsonb
     OR (NEW.split IS DISTINCT FROM OLD.split
         AND NOT coalesce(NEW.split ~ '^[A-Za-z0-9 _.-]+$'
                  AND lower(regexp_replace(NEW.split, '[^A-Za-z0-9]', '', 'g')) IN ({_EVALUATION_SQL}), false))) THEN
    RAISE EXCEPTION 'honed: a capture role may not move a run out of a held-out split, nor change its task';
  END IF;
  FOREACH mark IN ARRAY ARRAY['held_out_by', 'within_task_id', 'nested_task_ids_cut'] LOOP
    IF old_meta ? mark AND (new_meta -> mark) IS DISTINCT FROM (old_meta -> mark) THEN
      RAISE EXCEPTION 'honed: a capture role may not change what holds a run out (%)', mark;
    END IF;
  END LOOP;
  IF old_meta ? 'nested_task_ids' AND NOT coalesce((new_meta -> 'nested_task_ids') @> (old_meta -> 'nested_task_ids'), false) THEN
    RAISE EXCEPTION 'honed: a capture role may not change what holds a run out (nested_task_ids)';
  END IF;
  IF NEW.started_at > now() + interval '{_CLOCK_SKEW}' THEN NEW.started_at := OLD.started_at; END IF;
  IF NEW.ended_at > now() + interval '{_CLOCK_SKEW}' THEN NEW.ended_at := now(); END IF;
  RETURN NEW;
END $g$""")
        statements.append(f"DROP TRIGGER IF EXISTS {quote(guard)} ON trajectories")
        statements.append(
            f"CREATE TRIGGER {quote(guard)} BEFORE UPDATE ON trajectories FOR EACH ROW "
            f"WHEN (current_user = {_literal(role)}) EXECUTE FUNCTION {quote(guard)}()"
        )
        # When a run was stored is the database's word, not the role's: the gate's held-out
        # tasks are each defined by the run of theirs stored first (`tasks_from_store`), and a run
        # inserted as the role dated 2000-01-01 redefined an operator's held-out task, its prompt
        # and expected answer, and a worse model was promoted (a QA pass, session 27). Times a
        # run says it started or ended are kept unless they lie ahead of the database's clock.
        stamp = f"honed_capture_stamp_{role}"[:63]
        statements.append(f"""CREATE OR REPLACE FUNCTION {quote(stamp)}() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $s$
BEGIN
  NEW.created_at := now();
  IF NEW.started_at > now() + interval '{_CLOCK_SKEW}' THEN NEW.started_at := now(); END IF;
  IF NEW.ended_at > now() + interval '{_CLOCK_SKEW}' THEN NEW.ended_at := now(); END IF;
  RETURN NEW;
END $s$""")
        statements.append(f"DROP TRIGGER IF EXISTS {quote(stamp)} ON trajectories")
        statements.append(
            f"CREATE TRIGGER {quote(stamp)} BEFORE INSERT ON trajectories FOR EACH ROW "
            f"WHEN (current_user = {_literal(role)}) EXECUTE FUNCTION {quote(stamp)}()"
        )
        for statement in statements:
            conn.execute(text(statement))
        # What the role can still do in effect once granted, through a grant to PUBLIC, say.
        # Checked in the grants' transaction: refused, none of them stays.
        beyond = _writes_beyond_capture(conn, role, schema, tables) + _creates(conn, role)
        if beyond:
            raise ValueError(
                f"{role!r} can do more than capture here ({'; '.join(beyond[:4])}; granted to PUBLIC?): "
                "take those rights back (`REVOKE CREATE ON SCHEMA public FROM PUBLIC`, ...), or give the "
                "agent's process a role of its own"
            )
    return statements


# What capture may not do to the tables it writes (a paused run's update is row-level security's).
_NOT_CAPTURES = {"trajectories": ("DELETE", "TRUNCATE"), "steps": ("UPDATE", "DELETE", "TRUNCATE")}


def _acts_as(conn: Any, role: str, schema: str) -> list[str]:
    """The roles `role` can act as: any it is a member of, even one it does not inherit from
    (NOINHERIT: `SET ROLE` still works), and the owner of the schema's tables when it is that
    owner. As the owner, or `pg_write_all_data`, a capture role deleted verdicts (a QA pass,
    session 27): row-level security and the guard's triggers do not hold the owner."""
    return [
        name
        for (name,) in conn.execute(
            text(
                "SELECT g.rolname FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid "
                "JOIN pg_roles r ON r.oid = m.member WHERE r.rolname = :r "
                "UNION SELECT tableowner FROM pg_tables WHERE schemaname = :s "
                "AND pg_has_role(:r, tableowner, 'MEMBER') ORDER BY 1"
            ),
            {"r": role, "s": schema},
        )
    ]


def _writes_beyond_capture(conn: Any, role: str, schema: str, tables: list[str]) -> list[str]:
    """What `role` may write beyond capture in `schema`: a table capture does not write, or
    deleting from one it does."""
    found = []
    for table in tables:
        rights = _NOT_CAPTURES.get(table, ("INSERT", "UPDATE", "DELETE", "TRUNCATE"))
        held = [
            right
            for right in rights
            if conn.execute(
                text("SELECT has_table_privilege(:r, :t, :p)"),
                {"r": role, "t": f'"{schema}"."{table}"', "p": right},
            ).scalar()
        ]
        if held:
            found.append(f"{'/'.join(held)} on {table}")
    return found


def _creates(conn: Any, role: str) -> list[str]:
    """Where `role` may create objects: a schema (PostgreSQL 14 and earlier let PUBLIC create in
    `public`), or the database (a schema of its own, named after the owner, comes first on the
    owner's search path). An operator `=` for `varchar` made there is picked over the built-in one
    by the owner's queries, whatever their schema, and ran as the owner inside `honed label`:
    it deleted a person's fail (a QA pass, session 28). The guard's functions pin their own
    search path too, but the owner's statements cannot."""
    found = [
        f"CREATE on schema {name}"
        for (name,) in conn.execute(
            text(
                "SELECT nspname FROM pg_namespace WHERE has_schema_privilege(:r, oid, 'CREATE') "
                "AND nspname NOT LIKE 'pg\\_%' AND nspname <> 'information_schema' ORDER BY 1"
            ),
            {"r": role},
        )
    ]
    if conn.execute(
        text("SELECT has_database_privilege(:r, current_database(), 'CREATE')"), {"r": role}
    ).scalar():
        found.append("CREATE on the database")
    return found


_CLOCK_SKEW = "5 minutes"  # how far ahead of the database's clock a capturing host's may run


_PLAIN_TRAINING = re.compile(r"[A-Za-z _.-]*")


def possibly_held_out(split: str | None, metadata: dict[str, Any]) -> bool:
    """What the capture role's guard takes for a run that may be held out: a `held_out_by` mark,
    or a split that is not plainly `train`/`training` (SQL cannot know every name Python holds
    out). Such a paused run's split, task and metadata stay as they are, whoever resumes it."""
    if "held_out_by" in metadata:
        return True
    if split is None:
        return False
    return not (
        _PLAIN_TRAINING.fullmatch(split) and re.sub("[^A-Za-z]", "", split).lower() in ("train", "training")
    )


def check_capture_role(engine: Engine, role: str) -> None:
    """`ValueError` unless `role` can be held to capture here: the store is PostgreSQL, the role
    exists and is neither a superuser nor exempt from row-level security. `honed init` asks before
    it creates anything (a QA pass, session 26: a missing role left a new store behind its error)."""
    if engine.dialect.name != "postgresql":
        raise ValueError(
            "a capture role needs PostgreSQL: a SQLite store is one file, and whoever can write it can "
            "write every table (keep the verifier's and trainer's key out of the agent's process: "
            "`honed.store.signing`)"
        )
    with engine.connect() as conn:
        found = conn.execute(
            text("SELECT rolsuper OR rolbypassrls FROM pg_roles WHERE rolname = :r"), {"r": role}
        ).first()
    if found is None:
        quoted = engine.dialect.identifier_preparer.quote(role)
        raise ValueError(
            f"no role {role!r} here: create it first (CREATE ROLE {quoted} LOGIN PASSWORD '...')"
        )
    if found[0]:
        raise ValueError(
            f"{role!r} is a superuser or bypasses row-level security: it cannot be held to capture"
        )


# Splits a paused held-out run may move to (a resume labelled held out): names that
# `honed.store.select.evaluation_split` holds out as they are.
_EVALUATION_SQL = ", ".join(f"'{name}'" for name in sorted(EVALUATION_SPLITS))


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"
