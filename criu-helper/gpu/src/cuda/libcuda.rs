//! [`CudaDriver`] over the real driver library, `libcuda.so.1`, loaded at run time with
//! libloading: nothing CUDA is needed to build Kybernate, and nodes without a GPU never load it.
//!
//! The process checkpoint API (`cuCheckpointProcess*`) exists from driver r570 (CUDA 12.8) on; a
//! library without it is refused at load time ([`LoadError::MissingApi`]) rather than failing
//! in the middle of a checkpoint.

use std::ffi::{c_char, c_int, c_uint, CStr, OsStr};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use libloading::Library;

use super::driver::{
    parse_gpu_uuid, CudaDriver, CudaError, GpuPair, ProcessState, CUDA_ERROR_INVALID_VALUE, CUDA_ERROR_NOT_SUPPORTED,
    REMAP_MIN_DRIVER,
};

/// The default library name (found by the dynamic loader).
pub const LIBCUDA: &str = "libcuda.so.1";

/// `CUDA_ERROR_UNKNOWN`: reported for answers of the driver we cannot interpret.
const CUDA_ERROR_UNKNOWN: c_int = 999;

/// Why the driver library cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot load the CUDA driver library {}: {message}", path.display())]
    Open { path: PathBuf, message: String },
    #[error("{} has no {symbol}: the CUDA driver's checkpoint API needs driver r570 or newer (CUDA 12.8)", path.display())]
    MissingApi { path: PathBuf, symbol: &'static str },
}

// The argument structs of cuda.h. Each is 64 bytes in every CUDA release with the API; fields
// the driver added later (restore's gpuPairs/gpuPairsCount in CUDA 13, custom storage after
// that) live inside those 64 bytes and mean "not used" when zero, so zeroed structs of the full
// size stay correct for old and new drivers alike.

/// `CUcheckpointLockArgs`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct LockArgs {
    /// How long to wait for the process's submitted work; 0 = no limit.
    timeout_ms: c_uint,
    reserved0: c_uint,
    reserved1: [u64; 7],
}

/// `CUcheckpointCheckpointArgs`, `CUcheckpointRestoreArgs` and `CUcheckpointUnlockArgs`: all
/// reserved (must be zero) as far as we use them.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct ReservedArgs {
    reserved: [u64; 8],
}

/// `CUcheckpointGpuPair` (CUDA 13.0): two `CUuuid`s of 16 bytes.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct GpuPairArg {
    old_uuid: [u8; 16],
    new_uuid: [u8; 16],
}

/// `CUcheckpointRestoreArgs` as CUDA 13.0's cuda.h lays it out: the pairs' pointer and count,
/// then reserved bytes up to 56 and a reserved u64. In CUDA 12.8/12.9 the same 64 bytes are all
/// reserved, so pairs are only ever passed to a driver ≥ 13000.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct RestoreArgs {
    gpu_pairs: *mut GpuPairArg,
    gpu_pairs_count: c_uint,
    reserved: [u8; 52 - std::mem::size_of::<*mut GpuPairArg>()],
    reserved1: u64,
}

impl Default for RestoreArgs {
    fn default() -> Self {
        Self {
            gpu_pairs: std::ptr::null_mut(),
            gpu_pairs_count: 0,
            reserved: [0; 52 - std::mem::size_of::<*mut GpuPairArg>()],
            reserved1: 0,
        }
    }
}

type CuRestore = unsafe extern "C" fn(pid: c_int, args: *mut RestoreArgs) -> c_int;
type CuInit = unsafe extern "C" fn(flags: c_uint) -> c_int;
type CuDriverGetVersion = unsafe extern "C" fn(version: *mut c_int) -> c_int;
type CuGetErrorName = unsafe extern "C" fn(error: c_int, name: *mut *const c_char) -> c_int;
type CuLock = unsafe extern "C" fn(pid: c_int, args: *mut LockArgs) -> c_int;
type CuWithArgs = unsafe extern "C" fn(pid: c_int, args: *mut ReservedArgs) -> c_int;
type CuGetState = unsafe extern "C" fn(pid: c_int, state: *mut c_int) -> c_int;
type CuGetRestoreThreadId = unsafe extern "C" fn(pid: c_int, tid: *mut c_int) -> c_int;

/// The driver functions, copied out of the library; valid while `LibCuda::_lib` lives (and,
/// loaded with RTLD_NODELETE, for the life of the process).
#[derive(Clone, Copy)]
struct Api {
    init: CuInit,
    driver_get_version: CuDriverGetVersion,
    get_error_name: Option<CuGetErrorName>,
    lock: CuLock,
    checkpoint: CuWithArgs,
    restore: CuRestore,
    unlock: CuWithArgs,
    get_state: CuGetState,
    get_restore_thread_id: CuGetRestoreThreadId,
}

/// The CUDA driver library, loaded at run time.
pub struct LibCuda {
    path: PathBuf,
    api: Api,
    /// cuInit's result, from the first restore on.
    init: OnceLock<Result<(), CudaError>>,
    /// Keeps the functions of `api` mapped.
    _lib: Library,
}

impl std::fmt::Debug for LibCuda {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LibCuda").field("path", &self.path).field("init", &self.init.get()).finish_non_exhaustive()
    }
}

impl LibCuda {
    /// Loads `path` (a name the dynamic loader resolves, e.g. [`LIBCUDA`], or a path) and
    /// resolves the functions we call.
    pub fn load(path: &OsStr) -> Result<Self, LoadError> {
        let path_buf = PathBuf::from(path);
        if path.is_empty() {
            // dlopen("") would hand back the running program itself.
            return Err(LoadError::Open { path: path_buf, message: "no library named (empty path)".into() });
        }
        // RTLD_NODELETE: cuInit starts driver threads in this process that run the library's
        // code; it must stay mapped even after this value is dropped.
        let flags = libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_LOCAL | libc::RTLD_NODELETE;
        // SAFETY: loading runs the library's initialisers; libcuda's are meant to run in any
        // process that links it.
        let lib = unsafe { libloading::os::unix::Library::open(Some(path), flags) }
            .map_err(|e| LoadError::Open { path: path_buf.clone(), message: e.to_string() })?;
        let lib = Library::from(lib);

        let required = |symbol: &'static str| LoadError::MissingApi { path: path_buf.clone(), symbol };
        // SAFETY (all `sym` calls): each type above is the function's prototype in cuda.h.
        let api = unsafe {
            Api {
                init: sym(&lib, "cuInit").ok_or_else(|| required("cuInit"))?,
                driver_get_version: sym(&lib, "cuDriverGetVersion").ok_or_else(|| required("cuDriverGetVersion"))?,
                get_error_name: sym(&lib, "cuGetErrorName"),
                lock: sym(&lib, "cuCheckpointProcessLock").ok_or_else(|| required("cuCheckpointProcessLock"))?,
                checkpoint: sym(&lib, "cuCheckpointProcessCheckpoint")
                    .ok_or_else(|| required("cuCheckpointProcessCheckpoint"))?,
                restore: sym(&lib, "cuCheckpointProcessRestore")
                    .ok_or_else(|| required("cuCheckpointProcessRestore"))?,
                unlock: sym(&lib, "cuCheckpointProcessUnlock").ok_or_else(|| required("cuCheckpointProcessUnlock"))?,
                get_state: sym(&lib, "cuCheckpointProcessGetState")
                    .ok_or_else(|| required("cuCheckpointProcessGetState"))?,
                get_restore_thread_id: sym(&lib, "cuCheckpointProcessGetRestoreThreadId")
                    .ok_or_else(|| required("cuCheckpointProcessGetRestoreThreadId"))?,
            }
        };
        Ok(Self { path: path_buf, api, init: OnceLock::new(), _lib: lib })
    }

    /// The library as it was named to [`LibCuda::load`].
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// cuInit's error, if it was called (before the first restore) and failed. A restore can
    /// still work without it (persistence mode), so restore reports its own error; callers can
    /// add this one as the likely cause.
    pub fn init_error(&self) -> Option<&CudaError> {
        self.init.get().and_then(|r| r.as_ref().err())
    }

    /// Calls `cuInit(0)` once per process: the driver restores a process only when the caller
    /// initialised CUDA (or persistence mode is on).
    fn ensure_init(&self) {
        self.init.get_or_init(|| {
            // SAFETY: cuInit takes flags by value; 0 is the only valid value.
            let code = unsafe { (self.api.init)(0) };
            self.check("cuInit", 0, code)
        });
    }

    /// `Ok` for CUDA_SUCCESS, else the error with cuGetErrorName's text.
    fn check(&self, call: &'static str, pid: i32, code: c_int) -> Result<(), CudaError> {
        if code == 0 {
            return Ok(());
        }
        Err(CudaError { call, pid, code, name: self.error_name(code) })
    }

    /// `cuGetErrorName`, or the number when the driver has no name (or no such function).
    fn error_name(&self, code: c_int) -> String {
        let Some(get_error_name) = self.api.get_error_name else {
            return code.to_string();
        };
        let mut name: *const c_char = std::ptr::null();
        // SAFETY: `name` is a valid out-pointer; on success the driver points it to a static
        // NUL-terminated string.
        let rc = unsafe { get_error_name(code, &mut name) };
        if rc != 0 || name.is_null() {
            return code.to_string();
        }
        // SAFETY: non-null and NUL-terminated, per cuGetErrorName's contract.
        unsafe { CStr::from_ptr(name) }.to_string_lossy().into_owned()
    }

    fn with_reserved_args(&self, call: &'static str, f: CuWithArgs, pid: i32) -> Result<(), CudaError> {
        let mut args = ReservedArgs::default();
        // SAFETY: `args` is a zeroed struct of the size cuda.h declares, alive for the call.
        let code = unsafe { f(pid, &mut args) };
        self.check(call, pid, code)
    }
}

/// Resolves `name` as a function of type `T`; None when the library does not export it.
///
/// # Safety
/// `T` must be the function's actual prototype.
unsafe fn sym<T: Copy>(lib: &Library, name: &str) -> Option<T> {
    let mut symbol = Vec::with_capacity(name.len() + 1);
    symbol.extend_from_slice(name.as_bytes());
    symbol.push(0);
    // SAFETY: forwarded to the caller.
    unsafe { lib.get::<T>(&symbol) }.ok().map(|s| *s)
}

impl CudaDriver for LibCuda {
    fn driver_version(&self) -> Result<i32, CudaError> {
        let mut version: c_int = 0;
        // SAFETY: valid out-pointer.
        let code = unsafe { (self.api.driver_get_version)(&mut version) };
        self.check("cuDriverGetVersion", 0, code).map(|()| version)
    }

    fn lock(&self, pid: i32, timeout_ms: u32) -> Result<(), CudaError> {
        let mut args = LockArgs { timeout_ms, ..LockArgs::default() };
        // SAFETY: `args` is a CUcheckpointLockArgs with the reserved fields zeroed.
        let code = unsafe { (self.api.lock)(pid, &mut args) };
        self.check("cuCheckpointProcessLock", pid, code)
    }

    fn checkpoint(&self, pid: i32) -> Result<(), CudaError> {
        self.with_reserved_args("cuCheckpointProcessCheckpoint", self.api.checkpoint, pid)
    }

    fn restore(&self, pid: i32) -> Result<(), CudaError> {
        self.restore_onto(pid, &[])
    }

    fn restore_onto(&self, pid: i32, pairs: &[GpuPair]) -> Result<(), CudaError> {
        const CALL: &str = "cuCheckpointProcessRestore";
        let refuse = |code, name: String| Err(CudaError { call: CALL, pid, code, name });
        let mut wire = Vec::with_capacity(pairs.len());
        if !pairs.is_empty() {
            // Before CUDA 13.0 these bytes are reserved: a driver that does not know pairs must
            // never see them.
            let version = self.driver_version()?;
            if version < REMAP_MIN_DRIVER {
                return refuse(
                    CUDA_ERROR_NOT_SUPPORTED,
                    format!(
                        "restoring onto other GPUs needs CUDA 13.0 (driver r580) or newer; this driver is CUDA {}.{}",
                        version / 1000,
                        (version % 1000) / 10
                    ),
                );
            }
            for p in pairs {
                let (Some(old_uuid), Some(new_uuid)) = (parse_gpu_uuid(&p.old), parse_gpu_uuid(&p.new)) else {
                    return refuse(CUDA_ERROR_INVALID_VALUE, format!("GPU pair {p}: not two GPU UUIDs"));
                };
                wire.push(GpuPairArg { old_uuid, new_uuid });
            }
        }
        self.ensure_init();
        let mut args = RestoreArgs::default();
        if !wire.is_empty() {
            args.gpu_pairs = wire.as_mut_ptr();
            args.gpu_pairs_count = wire.len() as c_uint;
        }
        // SAFETY: `args` is a CUcheckpointRestoreArgs with its reserved bytes zeroed; `wire`
        // (the pairs it points to) outlives the call.
        let code = unsafe { (self.api.restore)(pid, &mut args) };
        self.check(CALL, pid, code)
    }

    fn unlock(&self, pid: i32) -> Result<(), CudaError> {
        self.with_reserved_args("cuCheckpointProcessUnlock", self.api.unlock, pid)
    }

    fn state(&self, pid: i32) -> Result<ProcessState, CudaError> {
        const CALL: &str = "cuCheckpointProcessGetState";
        let mut raw: c_int = -1;
        // SAFETY: valid out-pointer; CUprocessState is a C enum (int-sized).
        let code = unsafe { (self.api.get_state)(pid, &mut raw) };
        self.check(CALL, pid, code)?;
        ProcessState::from_raw(raw).ok_or_else(|| CudaError {
            call: CALL,
            pid,
            code: CUDA_ERROR_UNKNOWN,
            name: format!("unknown CUprocessState {raw}"),
        })
    }

    fn restore_thread_id(&self, pid: i32) -> Result<i32, CudaError> {
        let mut tid: c_int = 0;
        // SAFETY: valid out-pointer.
        let code = unsafe { (self.api.get_restore_thread_id)(pid, &mut tid) };
        self.check("cuCheckpointProcessGetRestoreThreadId", pid, code).map(|()| tid)
    }
}

#[cfg(test)]
mod tests {
    use std::mem::{align_of, offset_of, size_of};

    use super::*;

    #[test]
    fn argument_structs_have_the_sizes_of_cuda_h() {
        assert_eq!(size_of::<LockArgs>(), 64);
        assert_eq!(offset_of!(LockArgs, timeout_ms), 0);
        assert_eq!(offset_of!(LockArgs, reserved1), 8);
        assert_eq!(size_of::<ReservedArgs>(), 64);
        assert_eq!(align_of::<ReservedArgs>(), 8);
    }

    #[test]
    fn restore_args_have_the_layout_of_cuda_13() {
        assert_eq!(size_of::<RestoreArgs>(), 64);
        assert_eq!(offset_of!(RestoreArgs, gpu_pairs), 0);
        assert_eq!(offset_of!(RestoreArgs, gpu_pairs_count), 8);
        assert_eq!(offset_of!(RestoreArgs, reserved), 12);
        assert_eq!(offset_of!(RestoreArgs, reserved1), 56);
        assert_eq!(size_of::<GpuPairArg>(), 32);
        assert_eq!(offset_of!(GpuPairArg, new_uuid), 16);
        let args = RestoreArgs::default();
        // SAFETY: 64 bytes of plain data: a null pointer, integers and bytes, no padding.
        let bytes: [u8; 64] = unsafe { std::mem::transmute(args) };
        assert!(bytes.iter().all(|&b| b == 0), "no pairs: all zero, as CUDA 12.x requires");
    }

    #[test]
    fn zeroed_args_are_all_zero_bytes() {
        let lock = LockArgs { timeout_ms: 0, ..LockArgs::default() };
        // SAFETY: LockArgs is 64 bytes of plain integers without padding.
        let bytes: [u8; 64] = unsafe { std::mem::transmute(lock) };
        assert!(bytes.iter().all(|&b| b == 0));
        let lock = LockArgs { timeout_ms: 500, ..LockArgs::default() };
        // SAFETY: as above.
        let bytes: [u8; 64] = unsafe { std::mem::transmute(lock) };
        assert_eq!(u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]), 500);
        assert!(bytes[4..].iter().all(|&b| b == 0));
    }

    #[test]
    fn missing_library_is_an_open_error() {
        match LibCuda::load(OsStr::new("/nonexistent/libcuda.so.1")) {
            Err(LoadError::Open { path, message }) => {
                assert_eq!(path, Path::new("/nonexistent/libcuda.so.1"));
                assert!(!message.is_empty());
            }
            other => panic!("expected LoadError::Open, got {other:?}"),
        }
    }
}
