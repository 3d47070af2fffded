"""Who may speak on Ferry's internal sockets: ZMQ CURVE keys, and the sender of each
message checked against what its role may send (DESIGN §7, "Trust").

Keys (made by `ferry keys init DIR`, read from FERRY_KEYS_DIR or --keys-dir):

    DIR/cluster.key, cluster.key_secret   the server pair of every bound internal socket
                                          (inboxes, the scheduler's admin endpoint)
    DIR/<name>.key, <name>.key_secret     one pair per client identity; the public file
                                          carries metadata role = scheduler | gateway |
                                          worker | admin, and for a worker key made for
                                          one instance, instance = its instance id

A process binds with the cluster pair and connects with its own pair (FERRY_KEY_NAME, by
default its role: "gateway", "worker", ...). ZAP (a thread per process) admits a client
only if its public key is one of DIR/*.key and stamps every message it sends with the
User-Id "role:name:instance"; each receiver checks that id against the message type
(`Allowed`). A process without the cluster secret cannot even finish the handshake.

Keyless (no directory): nothing is encrypted or checked; fine on loopback (`ferry up`),
never across hosts. Pure but for `start`, which runs the ZAP thread.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

ROLES = ("scheduler", "gateway", "worker", "admin")
CLUSTER = "cluster"  # the server key pair's file name
ZAP_DOMAIN = "ferry"  # of every CURVE server socket; the ZAP handler serves this one
# Message fields that name the sending instance: a worker key made for one instance may
# only speak for that instance.
SENDER_FIELDS = ("instance_id", "src_instance_id")


class KeysError(ValueError):
    """Keys missing or malformed; the message says which file and what to run."""


@dataclass(frozen=True, slots=True)
class Sender:
    role: str  # one of ROLES; "" on a keyless socket (nothing is checked there)
    name: str  # the key's name
    instance_id: str = ""  # a worker key made for one instance; "" for any

    @property
    def user_id(self) -> str:
        return f"{self.role}:{self.name}:{self.instance_id}"

    @classmethod
    def from_user_id(cls, user_id: str | None) -> Sender:
        role, _, rest = (user_id or "").partition(":")
        name, _, instance_id = rest.partition(":")
        return cls(role=role if role in ROLES else "", name=name, instance_id=instance_id)


KEYLESS = Sender(role="", name="")

# message type -> roles that may send it (types not listed are refused)
Allowed = Mapping[type, frozenset[str]]


def refusal(msg: Any, sender: Sender, allowed: Allowed) -> str | None:
    """Why `sender` may not send `msg` on a socket with `allowed`, or None if it may."""
    roles = allowed.get(type(msg), frozenset())
    if sender.role not in roles:
        return (f"{type(msg).__name__} from {sender.role or 'an unknown sender'} "
                f"({sender.name or 'no key'}): only {', '.join(sorted(roles)) or 'nobody'}")
    if sender.instance_id:
        for field in SENDER_FIELDS:
            claimed = getattr(msg, field, None)
            if claimed is not None and claimed != sender.instance_id:
                return (f"{type(msg).__name__} claims {field}={claimed!r} but key "
                        f"{sender.name!r} is {sender.instance_id!r}'s")
    return None


@dataclass(frozen=True, slots=True)
class ClusterKeys:
    """One process's keys: the cluster server pair, its own client pair, and every client
    identity it admits (z85 public key -> Sender)."""

    directory: Path
    own: Sender
    server_public: bytes
    server_secret: bytes
    own_public: bytes
    own_secret: bytes
    peers: Mapping[bytes, Sender]

    def server(self, sock: zmq.Socket) -> None:
        """Make a socket about to bind a CURVE server admitting only known clients."""
        sock.curve_secretkey = self.server_secret
        sock.curve_publickey = self.server_public
        sock.curve_server = True
        sock.zap_domain = ZAP_DOMAIN.encode()

    def client(self, sock: zmq.Socket) -> None:
        """Make a socket about to connect a CURVE client with this process's identity."""
        sock.curve_secretkey = self.own_secret
        sock.curve_publickey = self.own_public
        sock.curve_serverkey = self.server_public

    def start(self, ctx: zmq.Context) -> ThreadAuthenticator:
        """Run the ZAP handler of this process's context (one per context)."""
        keys = self

        class Authenticator(ThreadAuthenticator):
            def curve_user_id(self, client_public_key: bytes) -> str:
                sender = keys.peers.get(zmq.utils.z85.encode(client_public_key))
                return sender.user_id if sender is not None else ""

        class Known:
            def callback(self, domain: str, z85_key: bytes) -> bool:
                return z85_key in keys.peers

        auth = Authenticator(zmq.Context.shadow(ctx.underlying))
        auth.start()
        auth.configure_curve_callback(domain=ZAP_DOMAIN, credentials_provider=Known())
        return auth


def load_keys(directory: str, name: str) -> ClusterKeys | None:
    """The keys in `directory` for identity `name`; None when directory is "" (keyless)."""
    if not directory:
        return None
    root = Path(directory)
    if not (root / f"{CLUSTER}.key_secret").is_file():
        raise KeysError(f"no {root / (CLUSTER + '.key_secret')}: make the keys with "
                        f"`ferry keys init {root}`")
    server_public, server_secret = zmq.auth.load_certificate(root / f"{CLUSTER}.key_secret")
    own_file = root / f"{name}.key_secret"
    if not own_file.is_file():
        raise KeysError(f"no key {own_file} for identity {name!r}: add it with "
                        f"`ferry keys add {root} {name} --role ROLE`")
    own_public, own_secret = zmq.auth.load_certificate(own_file)
    peers = identities(root)
    own = peers.get(own_public)
    if own is None or server_secret is None or own_secret is None:
        raise KeysError(f"{root}: {name}.key and {name}.key_secret do not match")
    return ClusterKeys(directory=root, own=own, server_public=server_public,
                       server_secret=server_secret, own_public=own_public,
                       own_secret=own_secret, peers=peers)


def identities(directory: str | os.PathLike) -> dict[bytes, Sender]:
    """Every client identity of a key directory: z85 public key -> Sender."""
    out = {}
    for public_file in sorted(Path(directory).glob("*.key")):
        if public_file.stem != CLUSTER:
            public, _ = zmq.auth.load_certificate(public_file)
            out[public] = _sender_of(public_file)
    return out


def _sender_of(public_file: Path) -> Sender:
    meta = {}
    for line in public_file.read_text().splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and key.strip() in ("role", "instance"):
            meta[key.strip()] = value.strip().strip('"')
    role = meta.get("role", "")
    if role not in ROLES:
        raise KeysError(f"{public_file}: role must be one of {', '.join(ROLES)}, got {role!r}")
    return Sender(role=role, name=public_file.stem, instance_id=meta.get("instance", ""))


def add_identity(directory: str | os.PathLike, name: str, role: str,
                 instance_id: str = "") -> Path:
    """Write the key pair of one client identity (refusing to overwrite one)."""
    if role not in ROLES:
        raise KeysError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    if not name or name == CLUSTER or "/" in name or name.startswith("."):
        raise KeysError(f"bad identity name {name!r}")
    root = Path(directory)
    if (root / f"{name}.key").exists():
        raise KeysError(f"{root / (name + '.key')} exists already")
    meta = {"role": role, **({"instance": instance_id} if instance_id else {})}
    return _write_pair(root, name, meta)


def _write_pair(root: Path, name: str, meta: dict[str, str]) -> Path:
    """NAME.key (public, with meta) and NAME.key_secret (mode 0600), in the ZMQ
    certificate layout `zmq.auth.load_certificate` reads."""
    public, secret = zmq.curve_keypair()
    lines = ["# Ferry CURVE key pair: see ferry/common/security.py", "metadata",
             *(f'    {k} = "{v}"' for k, v in meta.items()), "curve",
             f'    public-key = "{public.decode()}"']
    (root / f"{name}.key").write_text("\n".join(lines) + "\n")
    secret_file = root / f"{name}.key_secret"
    fd = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join([*lines, f'    secret-key = "{secret.decode()}"']) + "\n")
    return root / f"{name}.key"


def init_keys(directory: str | os.PathLike, identities: list[tuple[str, str, str]]) -> None:
    """A new key directory: the cluster server pair and the given (name, role, instance)
    identities. Refuses a directory that already has a cluster key."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o700)
    if (root / f"{CLUSTER}.key").exists():
        raise KeysError(f"{root} has keys already (delete it to start over)")
    _write_pair(root, CLUSTER, {})
    for name, role, instance_id in identities:
        add_identity(root, name, role, instance_id)


def check_role(keys: ClusterKeys, role: str) -> None:
    """A process must run with a key of its own role: a worker key on a gateway would be
    refused everywhere it speaks, in ways hard to read."""
    if keys.own.role != role:
        raise KeysError(f"key {keys.own.name!r} is a {keys.own.role} key; this process is "
                        f"a {role} (set FERRY_KEY_NAME or --key-name)")


# underlying context -> (its ZAP handler, the key directory whose identities it admits)
_AUTHENTICATORS: dict[int, tuple[ThreadAuthenticator, Path]] = {}


def stop(ctx: zmq.Context) -> None:
    """Stop the ZAP handler of ctx, if this module started one (before ctx is destroyed)."""
    auth, _ = _AUTHENTICATORS.pop(ctx.underlying, (None, None))
    if auth is not None:
        auth.stop()


def for_process(ctx: zmq.Context, keys_dir: str, key_name: str, role: str
                ) -> ClusterKeys | None:
    """Load this process's keys (identity `key_name`, by default its role) and start its
    context's ZAP handler once; None when keyless."""
    keys = load_keys(keys_dir, key_name or role)
    if keys is None:
        return None
    check_role(keys, role)
    running = _AUTHENTICATORS.get(ctx.underlying)
    if running is None or running[1] != keys.directory:  # (tests: several clusters)
        stop(ctx)
        _AUTHENTICATORS[ctx.underlying] = (keys.start(ctx), keys.directory)
    return keys


def describe(keys: ClusterKeys | None, bind: str) -> dict[str, Any]:
    """For the start-up log line: how the internal sockets are protected. bind: one of the
    process's bind endpoints (tcp://HOST:PORT)."""
    if keys is not None:
        return {"internal_sockets": "curve", "identity": keys.own.name}
    bind_host = bind.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    loopback = bind_host in ("127.0.0.1", "localhost", "::1")
    return {"internal_sockets": "plain" + ("" if loopback else
                                           " (UNAUTHENTICATED on a non-loopback interface: "
                                           "set FERRY_KEYS_DIR, see `ferry keys`)")}


def admin_keys() -> ClusterKeys | None:
    """The admin identity from the environment (FERRY_KEYS_DIR, FERRY_KEY_NAME or
    "admin"), for tools that ask the scheduler (ferry up's readiness, health checks)."""
    from ferry.common import env

    keys = load_keys(env.keys_dir(), env.key_name() or "admin")
    if keys is not None:
        check_role(keys, "admin")
    return keys
