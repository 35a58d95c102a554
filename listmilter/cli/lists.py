"""`listmilter list`: create, delete, show and configure lists."""

from __future__ import annotations

from os import EX_USAGE

from listmilter.cli.common import (
    Fail,
    admin,
    admin_user,
    existing_list,
    parse_list_address,
    parse_setting,
)


def add_parsers(sub) -> None:
    lst = sub.add_parser("list", help="create, delete, show and configure lists")
    ls = lst.add_subparsers(dest="action", metavar="ACTION", required=True)
    s = ls.add_parser("create", help="create a list")
    s.set_defaults(handler=admin(_create))
    s.add_argument("address")
    s.add_argument("--owner", action="append", default=[], help="owner address (repeatable)")
    s.add_argument("--posting", choices=("open", "members", "announce"))
    s.add_argument("--subject-prefix")
    s.add_argument("--description")
    s.add_argument("--notify", action="store_true", help="mail the site admin that the list exists")
    s = ls.add_parser("delete", help="delete a list and its members")
    s.set_defaults(handler=admin(_delete))
    s.add_argument("address")
    s = ls.add_parser("show", help="effective settings of a list and where each comes from")
    s.set_defaults(handler=admin(_show))
    s.add_argument("address")
    s = ls.add_parser("ls", help="all lists with their member counts")
    s.set_defaults(handler=admin(_ls))
    s = ls.add_parser("set", help="set a list setting (sqlite store)")
    s.set_defaults(handler=admin(_set))
    s.add_argument("address")
    s.add_argument("key")
    s.add_argument("value", nargs="+")
    s = ls.add_parser("unset", help="remove a list's own value for a setting")
    s.set_defaults(handler=admin(_unset))
    s.add_argument("address")
    s.add_argument("key")



def _create(args, cfg, store):
    address = parse_list_address(args.address)
    values = {"owners": args.owner or None, "posting": args.posting,
              "subject_prefix": args.subject_prefix, "description": args.description}
    list_settings = {k: parse_setting(k, v) for k, v in values.items() if v is not None}
    mlist = store.create_list(address, list_settings)
    print(f"created list {mlist.address}")
    if args.notify:
        from listmilter.app import notices, outgoing
        eff = cfg.list_settings(mlist.settings)
        message = notices.list_created(mlist.address, cfg.site_admin, eff.owners, eff.posting,
                                       admin_user())
        try:
            outgoing.send(cfg.outgoing, "", [cfg.site_admin], message)
        except outgoing.OutgoingError as e:
            raise Fail(f"list {mlist.address} was created, but the notice to {cfg.site_admin} "
                       f"was not sent: {e}") from None
        print(f"notified {cfg.site_admin}")


def _delete(args, cfg, store):
    address = parse_list_address(args.address)
    count = store.member_count(address)
    store.delete_list(address)
    print(f"deleted list {address} ({count} members)")


def _show(args, cfg, store):
    from listmilter.core import settings
    mlist = existing_list(store, args.address)
    print(f"list: {mlist.address}")
    print(f"defined in: {mlist.origin} ({store.backend} store)")
    members = store.members(mlist.address)
    disabled = sum(m.status != "active" for m in members)
    print(f"members: {len(members)}" + (f" ({disabled} disabled: they receive no posts)" if disabled else ""))
    for name in settings.SETTINGS:
        eff = cfg.effective(name, mlist.settings)
        print(f"{name} = {shown(eff.value)}    # {eff.origin}")


def shown(value) -> str:
    """A setting's value as an admin would write it in the config file (YAML), empty as (empty)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        value = ", ".join(value)
    if value == "":
        return "(empty)"
    if isinstance(value, str) and ("\n" in value or "\r" in value):
        import json
        return json.dumps(value, ensure_ascii=False)       # a footer: one line, \n for its line ends
    if isinstance(value, str) and value != value.strip():
        return f'"{value}"'         # the spaces matter (a subject prefix)
    return str(value)


def _ls(args, cfg, store):
    for mlist in store.all_lists():
        print(f"{mlist.address}\t{store.member_count(mlist.address)}")


def _set(args, cfg, store):
    from listmilter.core import settings
    if args.key not in settings.SETTINGS:
        raise Fail(f"unknown setting {args.key!r}; known: {', '.join(settings.SETTINGS)}", EX_USAGE)
    raw = args.value if args.key == "owners" else " ".join(args.value)
    value = parse_setting(args.key, raw)
    store.set_setting(parse_list_address(args.address), args.key,
                      list(value) if isinstance(value, tuple) else value)
    print(f"{parse_list_address(args.address)}: {args.key} = {shown(value)}")


def _unset(args, cfg, store):
    store.unset_setting(parse_list_address(args.address), args.key)
    print(f"{parse_list_address(args.address)}: {args.key} now comes from defaults")
