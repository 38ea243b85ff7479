"""The SDK a robot embeds: local model + router + cloud client + escalation log."""

from tandem.edge.escalation_log import EscalationLog, EscalationRecord
from tandem.edge.runtime import EdgeRuntime
from tandem.runtime.client import CloudClient
from tandem.runtime.types import Result, Tier

__all__ = ["CloudClient", "EdgeRuntime", "EscalationLog", "EscalationRecord", "Result", "Tier"]
