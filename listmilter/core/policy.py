"""Who may post, and when a list post is not expanded. Pure functions."""

from __future__ import annotations

from listmilter.core import addresses

NULL_SENDER = ""


def posting_refusal(policy: str, list_address: str, sender: str, sender_is_member: bool,
                    owners: tuple[str, ...]) -> str | None:
    """None if `sender` may post to the list, else the reason a human reads in the 550 reply."""
    is_owner = addresses.key(sender) in {addresses.key(o) for o in owners}
    if policy == "open" or is_owner:
        return None
    if policy == "members":
        if sender_is_member:
            return None
        return f"only members of {list_address} may post to it; {sender or '<>'} is not a member"
    if policy == "announce":
        return f"{list_address} is an announcement list; only its owners may post to it"
    raise ValueError(f"unknown posting policy {policy!r}")


def not_expanded_reason(sender: str, list_ids_in_message: list[str], list_id: str) -> str | None:
    """Why a message to a list address must not be expanded (None: expand it).

    Null-sender mail is a bounce or an auto-reply, never a post. A message
    that already carries this list's List-Id has been through the list once:
    expanding it again would start a mail loop.
    """
    if sender == NULL_SENDER:
        return "null sender"
    if any(f"<{list_id}>" in value.lower() for value in list_ids_in_message):
        return "mail loop: the message already carries this list's List-Id"
    return None
