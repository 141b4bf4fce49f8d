"""PostgreSQL: autovacuum the tables retention deletes from after 2% churn, not 20%

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-26 09:00:00

The retention cleaner deletes old events every minute, and every delivery is updated two
or three times on its way to DELIVERED; both leave dead row versions that only a vacuum
makes reusable. With PostgreSQL's defaults autovacuum waits until a fifth of a table is
dead, so a table carries up to 20% dead space and then vacuums it in one long run. On
events, deliveries and attempts (and the TOAST table holding large bodies) it starts after
2% (plus 1000 rows, so small installs do not vacuum for every few rows), and analyzes after
2% so the planner's picture of received_at follows the moving window. Storage parameters
only: ALTER TABLE ... SET takes a lock that blocks neither reads nor writes, and rewrites
nothing. SQLite: nothing to do (freed pages go to its freelist and are reused).
"""

from __future__ import annotations

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

TABLES = ("events", "deliveries", "attempts")
SETTINGS = {
    "autovacuum_vacuum_scale_factor": "0.02",
    "autovacuum_vacuum_threshold": "1000",
    "autovacuum_analyze_scale_factor": "0.02",
}
# Bodies above about 2 KiB live in the events table's TOAST table, which autovacuum
# treats as a table of its own.
TOAST_SETTINGS = {
    "toast.autovacuum_vacuum_scale_factor": "0.02",
    "toast.autovacuum_vacuum_threshold": "1000",
}


def _tables() -> list[tuple[str, dict[str, str]]]:
    return [(table, SETTINGS | (TOAST_SETTINGS if table == "events" else {})) for table in TABLES]


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table, settings in _tables():
        assignments = ", ".join(f"{name} = {value}" for name, value in settings.items())
        op.execute(f"ALTER TABLE {table} SET ({assignments})")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table, settings in _tables():
        op.execute(f"ALTER TABLE {table} RESET ({', '.join(settings)})")
