//! Procgen through the official prebuilt `libenv.so` (gym3's libenv C API), loaded with
//! dlopen from the asset cache. One library instance per env, stepped in the calling
//! thread (`num_threads = 0`); observations are written by the library straight into
//! buffers this struct owns.

use crate::{templates, Action, ActionSpace, Env, EnvError, EnvSpec, ProcgenConfig, Result, Step};
use std::any::Any;
use std::ffi::{c_char, c_int, c_void};
use std::path::PathBuf;
use std::sync::OnceLock;

/// The 16 games.
pub const GAMES: [&str; 16] = [
    "bigfish",
    "bossfight",
    "caveflyer",
    "chaser",
    "climber",
    "coinrun",
    "dodgeball",
    "fruitbot",
    "heist",
    "jumper",
    "leaper",
    "maze",
    "miner",
    "ninja",
    "plunder",
    "starpilot",
];

/// Procgen's own numbering of distribution modes.
pub fn distribution_mode(name: &str) -> Option<i32> {
    Some(match name {
        "easy" => 0,
        "hard" => 1,
        "extreme" => 2,
        "memory" => 10,
        "exploration" => 20,
        _ => return None,
    })
}

/// Level seeds procgen uses for its exploration mode.
fn exploration_level(game: &str) -> Option<u32> {
    Some(match game {
        "coinrun" => 1949448038,
        "caveflyer" => 1259048185,
        "leaper" => 1318677581,
        "jumper" => 1434825276,
        "maze" => 158988835,
        "heist" => 876640971,
        "climber" => 1561126160,
        "ninja" => 1123500215,
        _ => return None,
    })
}

const NUM_ACTIONS: usize = 15;
const OBS_BYTES: usize = crate::FRAME * crate::FRAME * 3;

// --- gym3 libenv.h, by value ---------------------------------------------------------

const NAME_LEN: usize = 128;
const DTYPE_UINT8: c_int = 1;
const DTYPE_INT32: c_int = 2;
const DTYPE_FLOAT32: c_int = 3;
const SPACE_OBSERVATION: c_int = 1;
const SPACE_ACTION: c_int = 2;
const SPACE_INFO: c_int = 3;

#[repr(C)]
struct LibenvOption {
    name: [c_char; NAME_LEN],
    dtype: c_int,
    count: c_int,
    data: *mut c_void,
}

#[repr(C)]
struct LibenvOptions {
    items: *mut LibenvOption,
    count: c_int,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct LibenvTensortype {
    name: [c_char; NAME_LEN],
    scalar_type: c_int,
    dtype: c_int,
    shape: [c_int; 16],
    ndim: c_int,
    low: u32,
    high: u32,
}

#[repr(C)]
struct LibenvBuffers {
    ob: *mut *mut c_void,
    rew: *mut f32,
    first: *mut u8,
    info: *mut *mut c_void,
    ac: *mut *mut c_void,
}

type MakeFn = unsafe extern "C" fn(c_int, LibenvOptions) -> *mut c_void;
type TensortypesFn = unsafe extern "C" fn(*mut c_void, c_int, *mut LibenvTensortype) -> c_int;
type SetBuffersFn = unsafe extern "C" fn(*mut c_void, *mut LibenvBuffers);
type HandleFn = unsafe extern "C" fn(*mut c_void);
type VersionFn = unsafe extern "C" fn() -> c_int;

struct Lib {
    _lib: libloading::Library,
    make: MakeFn,
    tensortypes: TensortypesFn,
    set_buffers: SetBuffersFn,
    observe: HandleFn,
    act: HandleFn,
    close: HandleFn,
    resource_root: PathBuf,
}

/// Loads `libenv.so` once per process (fetching the asset on first use).
fn lib() -> Result<&'static Lib> {
    static LIB: OnceLock<std::result::Result<Lib, String>> = OnceLock::new();
    LIB.get_or_init(|| load().map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| EnvError::Library(e.clone()))
}

fn load() -> Result<Lib> {
    let dir = dws_assets::ensure("procgen")?;
    let path = dir.join("prebuilt").join("libenv.so");
    let lib_err = |what: &str, e: libloading::Error| {
        EnvError::Library(format!(
            "{what} {}: {e} (Procgen's library needs the glib and zlib runtime libraries; \
             Debian: apt-get install libglib2.0-0 zlib1g)",
            path.display()
        ))
    };
    // SAFETY: loading a library runs its initialisers; libenv.so is the pinned, verified
    // procgen build, whose initialisers only set up static tables.
    let lib = unsafe { libloading::Library::new(&path) }.map_err(|e| lib_err("loading", e))?;
    // SAFETY: the symbol types follow gym3's libenv.h (LIBENV_VERSION 1), checked below.
    unsafe {
        let version: VersionFn = *lib
            .get(b"libenv_version\0")
            .map_err(|e| lib_err("libenv_version in", e))?;
        if version() != 1 {
            return Err(EnvError::Library(format!(
                "{} speaks libenv version {}, dws speaks version 1",
                path.display(),
                version()
            )));
        }
        let make: MakeFn = *lib
            .get(b"libenv_make\0")
            .map_err(|e| lib_err("symbol in", e))?;
        let tensortypes: TensortypesFn = *lib
            .get(b"libenv_get_tensortypes\0")
            .map_err(|e| lib_err("symbol in", e))?;
        let set_buffers: SetBuffersFn = *lib
            .get(b"libenv_set_buffers\0")
            .map_err(|e| lib_err("symbol in", e))?;
        let observe: HandleFn = *lib
            .get(b"libenv_observe\0")
            .map_err(|e| lib_err("symbol in", e))?;
        let act: HandleFn = *lib
            .get(b"libenv_act\0")
            .map_err(|e| lib_err("symbol in", e))?;
        let close: HandleFn = *lib
            .get(b"libenv_close\0")
            .map_err(|e| lib_err("symbol in", e))?;
        let mut resource_root = dir.join("assets").into_os_string();
        resource_root.push("/");
        Ok(Lib {
            _lib: lib,
            make,
            tensortypes,
            set_buffers,
            observe,
            act,
            close,
            resource_root: resource_root.into(),
        })
    }
}

/// Option values kept alive for as long as the library instance lives.
enum OptValue {
    Bytes(Vec<u8>),
    Int(Box<i32>),
}

/// One live `libenv_env` with the buffers it writes into.
struct Instance {
    handle: *mut c_void,
    obs: Box<[u8; OBS_BYTES]>,
    rew: Box<f32>,
    first: Box<u8>,
    /// One buffer per info key (scalars of at most 4 bytes in procgen).
    info: Vec<[u8; 4]>,
    info_names: Vec<String>,
    action: Box<i32>,
    // Pointer arrays handed to libenv_set_buffers; must outlive the handle.
    _ob_ptrs: Box<[*mut c_void; 1]>,
    _info_ptrs: Vec<*mut c_void>,
    _ac_ptrs: Box<[*mut c_void; 1]>,
    _options: Vec<OptValue>,
}

// SAFETY: an instance is used from one thread at a time (it is owned by one env), and
// libenv promises that distinct instances may be used from different threads.
unsafe impl Send for Instance {}

impl Drop for Instance {
    fn drop(&mut self) {
        if let Ok(lib) = lib() {
            // SAFETY: handle came from libenv_make and is closed once.
            unsafe { (lib.close)(self.handle) };
        }
    }
}

fn c_name(name: &str) -> [c_char; NAME_LEN] {
    let mut out = [0 as c_char; NAME_LEN];
    for (o, b) in out.iter_mut().zip(name.bytes().take(NAME_LEN - 1)) {
        *o = b as c_char;
    }
    out
}

fn name_of(raw: &[c_char; NAME_LEN]) -> String {
    raw.iter()
        .take_while(|c| **c != 0)
        .map(|c| *c as u8 as char)
        .collect()
}

impl Instance {
    fn new(config: &ProcgenConfig, rand_seed: i32) -> Result<Self> {
        let lib = lib()?;
        let mode =
            distribution_mode(&config.distribution_mode).ok_or_else(|| EnvError::BadOption {
                id: format!("procgen:{}", config.game),
                detail: format!("distribution_mode `{}`", config.distribution_mode),
            })?;
        let (mode, num_levels, start_level) = if config.distribution_mode == "exploration" {
            let level = exploration_level(&config.game).ok_or_else(|| EnvError::BadOption {
                id: format!("procgen:{}", config.game),
                detail: "this game has no exploration mode".into(),
            })?;
            (1, 1, level)
        } else {
            (mode, config.num_levels, config.start_level)
        };
        let root = lib.resource_root.to_string_lossy().into_owned();
        let mut values: Vec<(&str, OptValue)> = vec![
            (
                "env_name",
                OptValue::Bytes(config.game.clone().into_bytes()),
            ),
            ("resource_root", OptValue::Bytes(root.into_bytes())),
            ("num_levels", OptValue::Int(Box::new(num_levels as i32))),
            ("start_level", OptValue::Int(Box::new(start_level as i32))),
            ("num_actions", OptValue::Int(Box::new(NUM_ACTIONS as i32))),
            ("rand_seed", OptValue::Int(Box::new(rand_seed))),
            ("num_threads", OptValue::Int(Box::new(0))),
            ("distribution_mode", OptValue::Int(Box::new(mode))),
            ("debug_mode", OptValue::Int(Box::new(0))),
        ];
        for (name, on) in [
            ("use_sequential_levels", config.use_sequential_levels),
            ("center_agent", config.center_agent),
            ("use_backgrounds", config.use_backgrounds),
            ("use_monochrome_assets", config.use_monochrome_assets),
            ("restrict_themes", config.restrict_themes),
            ("paint_vel_info", config.paint_vel_info),
            ("use_generated_assets", false),
            ("render_human", false),
        ] {
            values.push((name, OptValue::Bytes(vec![on as u8])));
        }
        let mut items: Vec<LibenvOption> = values
            .iter_mut()
            .map(|(name, v)| {
                let (dtype, count, data) = match v {
                    OptValue::Bytes(b) => (DTYPE_UINT8, b.len() as c_int, b.as_mut_ptr().cast()),
                    OptValue::Int(i) => (DTYPE_INT32, 1, (&mut **i as *mut i32).cast()),
                };
                LibenvOption {
                    name: c_name(name),
                    dtype,
                    count,
                    data,
                }
            })
            .collect();
        let options = LibenvOptions {
            items: items.as_mut_ptr(),
            count: items.len() as c_int,
        };
        // SAFETY: options point at `items` and `values`, alive across the call; the
        // library copies what it keeps, and `values` stays alive in the instance anyway.
        let handle = unsafe { (lib.make)(1, options) };
        if handle.is_null() {
            return Err(EnvError::Library(format!(
                "libenv_make returned no environment for procgen:{}",
                config.game
            )));
        }
        let spaces = |space: c_int| -> Vec<LibenvTensortype> {
            // SAFETY: first call counts, second fills a buffer of that length.
            unsafe {
                let n = (lib.tensortypes)(handle, space, std::ptr::null_mut());
                let mut out = vec![
                    LibenvTensortype {
                        name: [0; NAME_LEN],
                        scalar_type: 0,
                        dtype: 0,
                        shape: [0; 16],
                        ndim: 0,
                        low: 0,
                        high: 0,
                    };
                    n.max(0) as usize
                ];
                (lib.tensortypes)(handle, space, out.as_mut_ptr());
                out
            }
        };
        let obs_space = spaces(SPACE_OBSERVATION);
        let act_space = spaces(SPACE_ACTION);
        let info_space = spaces(SPACE_INFO);
        let shape_ok = obs_space.len() == 1
            && obs_space[0].dtype == DTYPE_UINT8
            && obs_space[0].shape[..obs_space[0].ndim as usize] == [64, 64, 3];
        let act_ok = act_space.len() == 1 && act_space[0].dtype == DTYPE_INT32;
        let info_ok = info_space
            .iter()
            .all(|t| t.ndim == 0 && matches!(t.dtype, DTYPE_UINT8 | DTYPE_INT32 | DTYPE_FLOAT32));
        if !(shape_ok && act_ok && info_ok) {
            // SAFETY: close the handle we made before failing.
            unsafe { (lib.close)(handle) };
            return Err(EnvError::Library(
                "procgen's libenv.so describes spaces dws does not expect (64×64×3 u8 \
                 observation, one int32 action, scalar infos)"
                    .into(),
            ));
        }
        let mut inst = Instance {
            handle,
            obs: Box::new([0; OBS_BYTES]),
            rew: Box::new(0.0),
            first: Box::new(0),
            info: vec![[0u8; 4]; info_space.len()],
            info_names: info_space.iter().map(|t| name_of(&t.name)).collect(),
            action: Box::new(0),
            _ob_ptrs: Box::new([std::ptr::null_mut()]),
            _info_ptrs: Vec::new(),
            _ac_ptrs: Box::new([std::ptr::null_mut()]),
            _options: values.into_iter().map(|(_, v)| v).collect(),
        };
        inst._ob_ptrs[0] = inst.obs.as_mut_ptr().cast();
        inst._ac_ptrs[0] = (&mut *inst.action as *mut i32).cast();
        inst._info_ptrs = inst
            .info
            .iter_mut()
            .map(|b| b.as_mut_ptr().cast())
            .collect();
        let mut bufs = LibenvBuffers {
            ob: inst._ob_ptrs.as_mut_ptr(),
            rew: &mut *inst.rew,
            first: &mut *inst.first,
            info: inst._info_ptrs.as_mut_ptr(),
            ac: inst._ac_ptrs.as_mut_ptr(),
        };
        // SAFETY: every buffer is heap-allocated, owned by `inst`, and lives until close.
        unsafe {
            (lib.set_buffers)(handle, &mut bufs);
            (lib.observe)(handle);
        }
        Ok(inst)
    }

    fn info_i32(&self, name: &str) -> Option<i32> {
        let i = self.info_names.iter().position(|n| n == name)?;
        Some(i32::from_ne_bytes(self.info[i]))
    }
}

/// One Procgen game.
pub struct ProcgenEnv {
    config: ProcgenConfig,
    spec: EnvSpec,
    inst: Option<Instance>,
    /// The frame handed out by [`Env::obs`] (the library's buffer is copied here).
    frame: Vec<u8>,
    /// Set after a terminal step: the library already shows the next episode.
    next_episode_ready: bool,
    needs_reset: bool,
    steps: u32,
    /// Counter for `reset(None)` before any seeded reset.
    unseeded: u64,
    level_seed: Option<i32>,
}

impl ProcgenEnv {
    pub fn new(config: ProcgenConfig) -> Result<Self> {
        if !GAMES.contains(&config.game.as_str()) {
            return Err(EnvError::UnknownEnv {
                id: format!("procgen:{}", config.game),
                hint: format!("games: {}", GAMES.join(", ")),
            });
        }
        lib()?;
        let spec = EnvSpec {
            id: format!("procgen:{}", config.game),
            action_space: ActionSpace::Discrete { n: NUM_ACTIONS },
            frame_shape: [crate::FRAME, crate::FRAME, 3],
            action_templates: templates::procgen(&config.game),
            final_frame_rendered: false,
        };
        Ok(Self {
            config,
            spec,
            inst: None,
            frame: vec![0; OBS_BYTES],
            next_episode_ready: false,
            needs_reset: true,
            steps: 0,
            unseeded: 0,
            level_seed: None,
        })
    }

    fn start(&mut self) {
        let inst = self.inst.as_ref().expect("instance made before start");
        self.frame.copy_from_slice(&inst.obs[..]);
        self.level_seed = inst.info_i32("level_seed");
        self.next_episode_ready = false;
        self.needs_reset = false;
        self.steps = 0;
    }
}

impl Env for ProcgenEnv {
    fn spec(&self) -> &EnvSpec {
        &self.spec
    }

    fn reset(&mut self, seed: Option<u64>) -> Result<()> {
        match seed {
            None if self.next_episode_ready => {}
            None if self.inst.is_some() => {
                // The current episode is abandoned; the library's own sequence goes on
                // with a fresh instance seeded from the counter.
                self.unseeded += 1;
                self.inst = None;
                self.inst = Some(Instance::new(&self.config, self.unseeded as i32)?);
            }
            _ => {
                let s = seed.unwrap_or(self.unseeded);
                // libenv takes a 31-bit seed.
                let rand_seed = (s % (1 << 31)) as i32;
                self.inst = None;
                self.inst = Some(Instance::new(&self.config, rand_seed)?);
            }
        }
        self.start();
        Ok(())
    }

    fn step(&mut self, action: &Action) -> Result<Step> {
        if self.needs_reset {
            return Err(EnvError::NeedsReset {
                id: self.spec.id.clone(),
            });
        }
        let a = match action {
            Action::Discrete(a) if (*a as usize) < NUM_ACTIONS => *a as i32,
            _ => {
                return Err(EnvError::InvalidAction {
                    id: self.spec.id.clone(),
                    action: action.clone(),
                    space: self.spec.action_space.to_string(),
                })
            }
        };
        let lib = lib()?;
        let inst = self.inst.as_mut().expect("reset made an instance");
        *inst.action = a;
        // SAFETY: the handle and its buffers are alive; one thread uses them.
        unsafe {
            (lib.act)(inst.handle);
            (lib.observe)(inst.handle);
        }
        self.steps += 1;
        let terminated = *inst.first != 0;
        let truncated = !terminated
            && self
                .config
                .max_episode_steps
                .is_some_and(|m| self.steps >= m);
        if terminated {
            // The library has already moved on to the next episode: keep showing the last
            // frame (procgen never renders the terminal state).
            self.next_episode_ready = true;
        } else {
            self.frame.copy_from_slice(&inst.obs[..]);
        }
        self.needs_reset = terminated || truncated;
        Ok(Step {
            reward: *inst.rew,
            terminated,
            truncated,
        })
    }

    fn obs(&self) -> &[u8] {
        &self.frame
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn episode_info(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut m = serde_json::Map::new();
        if let Some(level) = self.level_seed {
            m.insert("level_seed".into(), level.into());
        }
        m
    }
}
