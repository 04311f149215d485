"""Confines the TFF worker's view of the filesystem and drops its privileges.

An approved computation runs arbitrary TensorFlow graphs, and graphs can read
and write files (`tf.io.read_file`, `tf.io.write_file`, dataset readers). The
network namespace keeps the worker off the network; this module keeps it off
the host's files. `netns_relay` starts `worker_binary` with `preexec_hook()`
as its `preexec_fn`, so that between fork and exec the child

1. enters a new mount namespace with private propagation (the relay stays in
   the host's mount namespace, so its unix socket stays reachable);
2. builds a read-only tmpfs root holding only: the worker binary, `/usr` (and
   the `/lib*`, `/bin` links into it), `/dev/{null,zero,random,urandom}`, a
   fresh `/proc` of its own PID namespace, a writable scratch tmpfs `/tmp`,
   and the data directory, bind-mounted read-only at `/data`, its working
   directory;
3. pivots into that root and detaches the host's;
4. empties its capability sets (bounding, ambient, inheritable), sets
   `no_new_privs`, and becomes uid/gid 65534 (`nobody`) with no supplementary
   groups. Where the relay runs as real root, the data directory is mounted
   with an ID mapping that shows its owner's files as owned by 65534, so the
   worker reads the data with the owner's permissions and nothing more. In an
   unprivileged user namespace (`unshare --map-root-user`, only uid 0 is
   mapped) the worker keeps that mapped uid, which is the invoking user.

The relay first moves its future children into a new PID namespace
(`enter_pid_namespace()`), so the worker is PID 1 there and sees, and can
signal, no other process. As the init of its namespace it ignores signals it
has no handler for except SIGKILL: end it with SIGKILL.

Kept free of heavy imports: it runs in the relay process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import functools
import os
import platform
import select
import signal
from collections.abc import Callable

from fedpipe.errors import FedpipeError

# How the relay's error report starts when the worker cannot be confined.
CONFINEMENT_FAILED = "cannot confine the worker's filesystem"
NOBODY = 65534
DATA_DIR_INSIDE = '/data'
SCRATCH_DIR_INSIDE = '/tmp'
_DEVICES = ('null', 'zero', 'random', 'urandom')
_RELOCATED_PREFIX = '/opt/fedpipe-worker'
# Host paths that are symbolic links into /usr on merged-/usr systems, or
# directories bind-mounted read-only otherwise.
_SYSTEM_PATHS = ('/usr', '/lib', '/lib64', '/lib32', '/libx32', '/bin', '/sbin')

_CLONE_NEWNS = 0x00020000
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWPID = 0x20000000
_MS_RDONLY = 0x1
_MS_NOSUID = 0x2
_MS_NODEV = 0x4
_MS_NOEXEC = 0x8
_MS_REMOUNT = 0x20
_MS_BIND = 0x1000
_MS_REC = 0x4000
_MS_PRIVATE = 1 << 18
_MNT_DETACH = 0x2
_AT_FDCWD = -100
_AT_EMPTY_PATH = 0x1000
_AT_RECURSIVE = 0x8000
_OPEN_TREE_CLONE = 0x1
_OPEN_TREE_CLOEXEC = os.O_CLOEXEC
_MOVE_MOUNT_F_EMPTY_PATH = 0x4
_MOUNT_ATTR_RDONLY = 0x1
_MOUNT_ATTR_NOSUID = 0x2
_MOUNT_ATTR_NODEV = 0x4
_MOUNT_ATTR_IDMAP = 0x100000
_PR_SET_PDEATHSIG = 1
_PR_CAPBSET_DROP = 24
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
# Syscalls without a glibc wrapper. open_tree, move_mount and mount_setattr
# have the same number on every architecture.
_SYS_OPEN_TREE = 428
_SYS_MOVE_MOUNT = 429
_SYS_MOUNT_SETATTR = 442
_ARCH_SYSCALLS = {  # (pivot_root, capset)
  'x86_64': (155, 126),
  'aarch64': (41, 91),
}


class SandboxError(FedpipeError, RuntimeError):
  """The worker's filesystem cannot be confined on this host."""


class _MountAttr(ctypes.Structure):
  _fields_ = [
    ('attr_set', ctypes.c_uint64),
    ('attr_clr', ctypes.c_uint64),
    ('propagation', ctypes.c_uint64),
    ('userns_fd', ctypes.c_uint64),
  ]


class _CapHeader(ctypes.Structure):
  _fields_ = [('version', ctypes.c_uint32), ('pid', ctypes.c_int)]


class _CapData(ctypes.Structure):
  _fields_ = [
    ('effective', ctypes.c_uint32),
    ('permitted', ctypes.c_uint32),
    ('inheritable', ctypes.c_uint32),
  ]


@functools.cache
def _libc() -> ctypes.CDLL:
  # find_library may run a subprocess: never call it first after enter_pid_namespace().
  libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6', use_errno=True)
  libc.syscall.restype = ctypes.c_long
  return libc


def _check(result: int, what: str) -> int:
  if result < 0:
    errno = ctypes.get_errno()
    raise OSError(errno, f'{what}: {os.strerror(errno)}')
  return result


def _in_initial_user_namespace() -> bool:
  with open('/proc/self/uid_map') as f:
    return f.read().split() == ['0', '0', '4294967295']


def enter_pid_namespace() -> None:
  """Makes the caller's next child the init of a new PID namespace.

  The caller itself stays in its namespace; only children forked afterwards
  are inside, and once the first of them (the namespace's init) has exited,
  the caller cannot fork at all.

  Raises:
    SandboxError: If the kernel refuses a new PID namespace.
  """
  libc = _libc()
  if libc.unshare(_CLONE_NEWPID) != 0:
    errno = ctypes.get_errno()
    raise SandboxError(f'cannot create a PID namespace for the worker: {os.strerror(errno)}')


def _idmap_user_namespace(libc: ctypes.CDLL, owner_uid: int, owner_gid: int) -> int:
  """Returns an fd of a user namespace that maps the owner's ids to 65534.

  Such a namespace, attached to a mount, makes the owner's files appear as
  owned by 65534 on that mount only.
  """
  ready_r, ready_w = os.pipe()
  done_r, done_w = os.pipe()
  pid = os.fork()
  if pid == 0:  # Holds the namespace open until the parent has opened it.
    try:
      os.close(ready_r)
      os.close(done_w)
      ok = libc.unshare(_CLONE_NEWUSER) == 0
      os.write(ready_w, b'1' if ok else b'0')
      os.read(done_r, 1)
    finally:
      os._exit(0)
  os.close(ready_w)
  os.close(done_r)
  try:
    if os.read(ready_r, 1) != b'1':
      raise SandboxError("cannot create a user namespace for the data directory's ID mapping")
    with open(f'/proc/{pid}/uid_map', 'w') as f:
      f.write(f'{owner_uid} {NOBODY} 1\n')
    with open(f'/proc/{pid}/gid_map', 'w') as f:
      f.write(f'{owner_gid} {NOBODY} 1\n')
    return os.open(f'/proc/{pid}/ns/user', os.O_RDONLY | os.O_CLOEXEC)
  finally:
    os.close(ready_r)
    os.close(done_w)
    os.waitpid(pid, 0)


@dataclasses.dataclass
class Sandbox:
  """What the worker's `preexec_fn` needs, prepared in the relay before fork.

  Attributes:
    staging_dir: An empty directory private to the relay; the child mounts
      its new root over it (in its own mount namespace only).
    data_dir: The host directory mounted read-only at `/data`.
    executable: The worker binary on the host; `inside_executable` is where
      the worker sees it.
    error_fd: Where the child writes why confinement failed (the relay reads
      it when `Popen` raises).
    parent_alive_fd: Read end of a pipe whose write end only the relay keeps:
      end of file means the relay died before the child set its death
      signal.
  """

  staging_dir: str
  data_dir: str
  executable: str
  error_fd: int
  parent_alive_fd: int
  _parent_alive_w: int
  _error_r: int
  _idmap_fd: int | None
  _drop_to_nobody: bool
  _cap_last_cap: int
  _syscalls: tuple[int, int]

  @property
  def inside_executable(self) -> str:
    """The binary's path inside: the host path, unless that would fall in a
    directory the sandbox makes itself (a checkout under /tmp, say)."""
    top = self.executable.lstrip('/').split('/', 1)[0]
    if f'/{top}' in (SCRATCH_DIR_INSIDE, DATA_DIR_INSIDE, '/dev', '/proc'):
      return _RELOCATED_PREFIX + self.executable
    return self.executable

  def preexec_hook(self) -> Callable[[], None]:
    """Returns the `preexec_fn` that confines the child; see the module docstring."""
    libc = _libc()

    def hook() -> None:
      try:
        os.close(self._parent_alive_w)
        os.close(self._error_r)
        _check(libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), 'prctl(PDEATHSIG)')
        if select.select([self.parent_alive_fd], [], [], 0)[0]:
          os._exit(1)
        self._confine(libc)
        # Changing credentials cleared the death signal: set it again.
        _check(libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), 'prctl(PDEATHSIG)')
      except BaseException as e:
        os.write(self.error_fd, f'{e}'.encode(errors='replace')[:2000])
        raise

    return hook

  def _syscall(self, libc: ctypes.CDLL, number: int, *args, what: str) -> int:
    return _check(libc.syscall(ctypes.c_long(number), *args), what)

  def _bind(
    self,
    libc: ctypes.CDLL,
    source: str,
    target: str,
    *,
    read_only: bool,
    recursive: bool = False,
    idmap_fd: int | None = None,
  ) -> None:
    recursive_flag = _AT_RECURSIVE if recursive else 0
    tree = self._syscall(
      libc,
      _SYS_OPEN_TREE,
      ctypes.c_int(_AT_FDCWD),
      source.encode(),
      ctypes.c_uint(_OPEN_TREE_CLONE | _OPEN_TREE_CLOEXEC | recursive_flag),
      what=f'open_tree({source})',
    )
    try:
      attrs = _MOUNT_ATTR_NOSUID
      if read_only:
        attrs |= _MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NODEV
      attr = _MountAttr(attr_set=attrs)
      if idmap_fd is not None:
        attr.attr_set |= _MOUNT_ATTR_IDMAP
        attr.userns_fd = idmap_fd
      self._syscall(
        libc,
        _SYS_MOUNT_SETATTR,
        ctypes.c_int(tree),
        b'',
        ctypes.c_uint(_AT_EMPTY_PATH | recursive_flag),
        ctypes.byref(attr),
        ctypes.c_size_t(ctypes.sizeof(attr)),
        what=f'mount_setattr({source})',
      )
      self._syscall(
        libc,
        _SYS_MOVE_MOUNT,
        ctypes.c_int(tree),
        b'',
        ctypes.c_int(_AT_FDCWD),
        target.encode(),
        ctypes.c_uint(_MOVE_MOUNT_F_EMPTY_PATH),
        what=f'move_mount({source} -> {target})',
      )
    finally:
      os.close(tree)

  def _confine(self, libc: ctypes.CDLL) -> None:
    pivot_root, capset = self._syscalls
    root = self.staging_dir
    _check(libc.unshare(_CLONE_NEWNS), 'unshare(CLONE_NEWNS)')
    _check(libc.mount(None, b'/', None, _MS_REC | _MS_PRIVATE, None), 'make / private')
    _check(
      libc.mount(b'tmpfs', root.encode(), b'tmpfs', _MS_NOSUID | _MS_NODEV, b'mode=0755,size=1m'),
      'mount the root tmpfs',
    )
    for path in _SYSTEM_PATHS:
      if os.path.islink(path):
        os.symlink(os.readlink(path), root + path)
      elif os.path.isdir(path):
        os.mkdir(root + path)
        self._bind(libc, path, root + path, read_only=True)
    os.mkdir(root + '/dev')
    for name in _DEVICES:
      with open(f'{root}/dev/{name}', 'w'):
        pass
      self._bind(libc, f'/dev/{name}', f'{root}/dev/{name}', read_only=False)
    executable = root + self.inside_executable
    if not os.path.exists(executable):  # Not under /usr: mount the file alone.
      os.makedirs(os.path.dirname(executable), exist_ok=True)
      with open(executable, 'w'):
        pass
      self._bind(libc, self.executable, executable, read_only=True)
    os.mkdir(root + DATA_DIR_INSIDE)
    self._bind(
      libc,
      self.data_dir,
      root + DATA_DIR_INSIDE,
      read_only=True,
      recursive=True,
      idmap_fd=self._idmap_fd,
    )
    os.mkdir(root + SCRATCH_DIR_INSIDE)
    _check(
      libc.mount(
        b'tmpfs',
        (root + SCRATCH_DIR_INSIDE).encode(),
        b'tmpfs',
        _MS_NOSUID | _MS_NODEV,
        b'mode=1777',
      ),
      'mount the scratch tmpfs',
    )
    os.mkdir(root + '/proc')
    _check(
      libc.mount(
        b'proc', (root + '/proc').encode(), b'proc', _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, None
      ),
      'mount /proc',
    )
    _check(
      libc.mount(
        None,
        root.encode(),
        None,
        _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | _MS_NODEV,
        None,
      ),
      'make the root read-only',
    )
    os.chdir(root)
    self._syscall(libc, pivot_root, b'.', b'.', what='pivot_root')
    _check(libc.umount2(b'.', _MNT_DETACH), 'detach the host root')
    os.chdir(DATA_DIR_INSIDE)
    for cap in range(self._cap_last_cap + 1):
      _check(libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0), f'drop capability {cap}')
    _check(libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), 'clear ambient')
    if self._drop_to_nobody:
      os.setgroups([])
      os.setresgid(NOBODY, NOBODY, NOBODY)
      os.setresuid(NOBODY, NOBODY, NOBODY)
    header = _CapHeader(version=_LINUX_CAPABILITY_VERSION_3, pid=0)
    data = (_CapData * 2)()
    self._syscall(libc, capset, ctypes.byref(header), data, what='capset')
    _check(libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), 'prctl(NO_NEW_PRIVS)')

  def read_error(self) -> str:
    """Why the child failed to confine itself ('' if it did not say)."""
    os.set_blocking(self._error_r, False)
    try:
      return os.read(self._error_r, 4096).decode(errors='replace')
    except BlockingIOError:
      return ''

  def close(self) -> None:
    """Closes the relay's ends; call once the child has exec'd or failed."""
    for fd in (
      self.error_fd,
      self._error_r,
      self.parent_alive_fd,
      self._parent_alive_w,
      self._idmap_fd,
    ):
      if fd is not None:
        try:
          os.close(fd)
        except OSError:
          pass
    self._idmap_fd = None


def prepare(*, staging_dir: str, data_dir: str, executable: str) -> Sandbox:
  """Prepares, in the parent, the confinement of the next child.

  Args:
    staging_dir: An empty directory that only this process uses.
    data_dir: The directory the worker may read (its working directory).
    executable: The program the child will exec.

  Returns:
    A `Sandbox`; pass `preexec_hook()` to `Popen`, then call `close()`.

  Raises:
    SandboxError: If this host cannot confine the worker.
  """
  machine = platform.machine()
  if machine not in _ARCH_SYSCALLS:
    raise SandboxError(f'filesystem confinement is not implemented for {machine}')
  if os.listdir(staging_dir):
    raise SandboxError(f'sandbox staging directory {staging_dir} is not empty')
  with open('/proc/sys/kernel/cap_last_cap') as f:
    cap_last_cap = int(f.read())
  drop_to_nobody = _in_initial_user_namespace()
  libc = _libc()
  idmap_fd = None
  if drop_to_nobody:
    st = os.stat(data_dir)
    if st.st_uid != NOBODY or st.st_gid != NOBODY:
      idmap_fd = _idmap_user_namespace(libc, st.st_uid, st.st_gid)
  error_r, error_w = os.pipe()
  alive_r, alive_w = os.pipe()
  return Sandbox(
    staging_dir=os.path.abspath(staging_dir),
    data_dir=os.path.abspath(data_dir),
    executable=os.path.abspath(executable),
    error_fd=error_w,
    parent_alive_fd=alive_r,
    _parent_alive_w=alive_w,
    _error_r=error_r,
    _idmap_fd=idmap_fd,
    _drop_to_nobody=drop_to_nobody,
    _cap_last_cap=cap_last_cap,
    _syscalls=_ARCH_SYSCALLS[machine],
  )
