"""`ringlet cluster token`: the token other nodes join this machine's cluster with (`ringlet node --join TOKEN`)."""

from __future__ import annotations

import argparse
import os

from ringlet.cli import CliError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cluster", help="this machine's cluster key: print the token other nodes join with",
                       description="The cluster key in ~/.ringlet/cluster.key ($RINGLET_HOME) authenticates every "
                                   "link between nodes (mutual TLS). `token` prints it, creating one if there is "
                                   "none; paste it into `ringlet node --join TOKEN` on another machine.")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    actions.add_parser("token", help="print the token other nodes join with (treat it like a password)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ringlet.models.store import ringlet_home
    from ringlet.net.trust import CLUSTER_KEY_ENV, cluster_secret, token_of

    try:
        secret = cluster_secret(ringlet_home(), os.environ.get(CLUSTER_KEY_ENV))
    except ValueError as error:
        raise CliError(str(error)) from None
    print(token_of(secret))
    return 0
