"""The checker registry: the one place the `db_type` choices come from.

Adding an engine is one module in this package plus one line here.
"""

from __future__ import annotations

from probe.checkers.base import Checker, Facts, Target, Trace
from probe.checkers.mongodb import MongoDBChecker
from probe.checkers.mysql import MySQLChecker
from probe.checkers.postgresql import PostgreSQLChecker

CHECKERS: dict[str, Checker] = {
    "mysql": MySQLChecker(),
    "taurus": MySQLChecker(),  # GaussDB(for MySQL) speaks the MySQL protocol
    "postgresql": PostgreSQLChecker(),
    "mongodb": MongoDBChecker(),  # self-built MongoDB and DDS
}

__all__ = ["CHECKERS", "Checker", "Facts", "Target", "Trace"]
