//! Atari 2600 games through the Arcade Learning Environment (GPL-2.0; compiled only with
//! the cargo feature `atari`), with the standard wrappers: frame skip with a max over the
//! last two frames, sticky actions (ALE's `repeat_action_probability`), optional episodic
//! life, full or minimal action set, and the observation resized to 64×64 RGB by area
//! averaging.

use crate::config::AtariConfig;
use crate::{templates, Action, ActionSpace, Env, EnvError, EnvSpec, Result, Step, FRAME};
use std::any::Any;
use std::ffi::{c_char, c_int, c_void, CString};

extern "C" {
    fn dws_ale_new(
        rom: *const c_char,
        seed: c_int,
        sticky: f32,
        err: *mut c_char,
        err_cap: c_int,
    ) -> *mut c_void;
    fn dws_ale_free(h: *mut c_void);
    fn dws_ale_actions(h: *mut c_void, minimal: c_int, out: *mut c_int, cap: c_int) -> c_int;
    fn dws_ale_act(h: *mut c_void, action: c_int) -> c_int;
    fn dws_ale_game_over(h: *mut c_void) -> c_int;
    fn dws_ale_lives(h: *mut c_void) -> c_int;
    fn dws_ale_reset(h: *mut c_void);
    fn dws_ale_height(h: *mut c_void) -> c_int;
    fn dws_ale_width(h: *mut c_void) -> c_int;
    fn dws_ale_screen_rgb(h: *mut c_void, out: *mut u8);
}

/// One live ALE instance.
struct Ale(*mut c_void);

// SAFETY: an ALE instance has no thread affinity; it is used by one env at a time.
unsafe impl Send for Ale {}

impl Drop for Ale {
    fn drop(&mut self) {
        // SAFETY: made by dws_ale_new, freed once.
        unsafe { dws_ale_free(self.0) }
    }
}

/// Area-averaging weights from `src` samples onto `dst` samples along one axis.
fn area_weights(src: usize, dst: usize) -> Vec<Vec<(usize, f32)>> {
    let scale = src as f32 / dst as f32;
    (0..dst)
        .map(|o| {
            let (lo, hi) = (o as f32 * scale, (o + 1) as f32 * scale);
            let mut w = Vec::new();
            let mut i = lo.floor() as usize;
            while (i as f32) < hi && i < src {
                let overlap = (hi.min(i as f32 + 1.0) - lo.max(i as f32)).max(0.0);
                if overlap > 0.0 {
                    w.push((i, overlap / scale));
                }
                i += 1;
            }
            w
        })
        .collect()
}

/// An Atari game.
pub struct AtariEnv {
    config: AtariConfig,
    spec: EnvSpec,
    rom: CString,
    ale: Option<Ale>,
    /// ALE action ids behind our action indices.
    actions: Vec<c_int>,
    /// The last two raw screens `[h, w, 3]`, for the max-pool.
    screens: [Vec<u8>; 2],
    /// The vertical pass of the resize, `[64, width, 3]`.
    rowpass: Vec<f32>,
    frame: Vec<u8>,
    rows: Vec<Vec<(usize, f32)>>,
    cols: Vec<Vec<(usize, f32)>>,
    height: usize,
    width: usize,
    lives: i32,
    steps: u32,
    needs_reset: bool,
    /// The game itself is over (not just a life lost).
    game_over: bool,
    unseeded: u64,
}

impl AtariEnv {
    pub fn new(config: AtariConfig) -> Result<Self> {
        let roms = dws_assets::ensure("ale-roms")?;
        let path = roms.join(format!("{}.bin", config.game));
        if !path.is_file() {
            return Err(EnvError::UnknownEnv {
                id: format!("atari:{}", config.game),
                hint: format!("no ROM {} in the ale-roms asset", path.display()),
            });
        }
        let rom = CString::new(path.to_string_lossy().into_owned())
            .map_err(|_| EnvError::Library("ROM path holds a NUL byte".into()))?;
        let mut env = Self {
            spec: EnvSpec {
                id: format!("atari:{}", config.game),
                action_space: ActionSpace::Discrete { n: 0 },
                frame_shape: [FRAME, FRAME, 3],
                action_templates: Vec::new(),
                final_frame_rendered: true,
            },
            config,
            rom,
            ale: None,
            actions: Vec::new(),
            screens: [Vec::new(), Vec::new()],
            rowpass: Vec::new(),
            frame: vec![0; FRAME * FRAME * 3],
            rows: Vec::new(),
            cols: Vec::new(),
            height: 0,
            width: 0,
            lives: 0,
            steps: 0,
            needs_reset: true,
            game_over: true,
            unseeded: 0,
        };
        env.open(0)?;
        let mut ids = [0 as c_int; 32];
        let ale = env.ale.as_ref().expect("opened").0;
        // SAFETY: the buffer holds 32 ids; ALE has at most 18 actions.
        let n = unsafe {
            dws_ale_actions(
                ale,
                (!env.config.full_action_space) as c_int,
                ids.as_mut_ptr(),
                32,
            )
        };
        env.actions = ids[..n.clamp(0, 32) as usize].to_vec();
        env.spec.action_space = ActionSpace::Discrete {
            n: env.actions.len(),
        };
        env.spec.action_templates = env
            .actions
            .iter()
            .map(|&a| templates::ATARI_ACTIONS[a as usize].to_string())
            .collect();
        Ok(env)
    }

    /// A fresh instance seeded with `seed` (ALE applies its seed when loading the ROM).
    fn open(&mut self, seed: u64) -> Result<()> {
        self.ale = None;
        let mut err = [0 as c_char; 512];
        // SAFETY: rom is a valid C string; err has the stated capacity.
        let h = unsafe {
            dws_ale_new(
                self.rom.as_ptr(),
                (seed % (1 << 31)) as c_int,
                self.config.sticky_actions,
                err.as_mut_ptr(),
                err.len() as c_int,
            )
        };
        if h.is_null() {
            let msg: String = err
                .iter()
                .take_while(|c| **c != 0)
                .map(|c| *c as u8 as char)
                .collect();
            return Err(EnvError::Library(format!(
                "ALE could not load {}: {msg}",
                self.rom.to_string_lossy()
            )));
        }
        // SAFETY: h is a live instance.
        let (height, width) = unsafe { (dws_ale_height(h) as usize, dws_ale_width(h) as usize) };
        self.ale = Some(Ale(h));
        if (height, width) != (self.height, self.width) {
            self.height = height;
            self.width = width;
            let n = height * width * 3;
            self.screens = [vec![0; n], vec![0; n]];
            self.rows = area_weights(height, FRAME);
            self.cols = area_weights(width, FRAME);
        }
        Ok(())
    }

    fn handle(&self) -> *mut c_void {
        self.ale.as_ref().expect("opened").0
    }

    fn grab(&mut self, slot: usize) {
        // SAFETY: the screen buffer holds height * width * 3 bytes.
        unsafe { dws_ale_screen_rgb(self.handle(), self.screens[slot].as_mut_ptr()) }
    }

    /// Max over the two screens, then area-resize into `frame` (rows first, then
    /// columns).
    fn make_frame(&mut self) {
        let w3 = self.width * 3;
        // [64, width, 3] after the vertical pass.
        self.rowpass.resize(FRAME * w3, 0.0);
        for (oy, rw) in self.rows.iter().enumerate() {
            let out = &mut self.rowpass[oy * w3..(oy + 1) * w3];
            out.fill(0.0);
            for &(y, wy) in rw {
                let a = &self.screens[0][y * w3..(y + 1) * w3];
                let b = &self.screens[1][y * w3..(y + 1) * w3];
                for ((o, pa), pb) in out.iter_mut().zip(a).zip(b) {
                    *o += (*pa).max(*pb) as f32 * wy;
                }
            }
        }
        for oy in 0..FRAME {
            let row = &self.rowpass[oy * w3..(oy + 1) * w3];
            for (ox, cw) in self.cols.iter().enumerate() {
                let mut acc = [0f32; 3];
                for &(x, wx) in cw {
                    for (c, a) in acc.iter_mut().enumerate() {
                        *a += row[x * 3 + c] * wx;
                    }
                }
                let o = (oy * FRAME + ox) * 3;
                for (dst, a) in self.frame[o..o + 3].iter_mut().zip(acc) {
                    *dst = a.round().clamp(0.0, 255.0) as u8;
                }
            }
        }
    }

    fn start(&mut self) {
        self.grab(0);
        let (s0, s1) = self.screens.split_at_mut(1);
        s1[0].copy_from_slice(&s0[0]);
        self.make_frame();
        // SAFETY: live instance.
        self.lives = unsafe { dws_ale_lives(self.handle()) };
        self.game_over = false;
        self.needs_reset = false;
        self.steps = 0;
    }
}

impl Env for AtariEnv {
    fn spec(&self) -> &EnvSpec {
        &self.spec
    }

    fn reset(&mut self, seed: Option<u64>) -> Result<()> {
        match seed {
            Some(s) => self.open(s)?,
            None if self.ale.is_none() => {
                self.unseeded += 1;
                self.open(self.unseeded)?;
            }
            // Episodic life: a lost life ended the episode but not the game; go on
            // from there with one no-op step.
            None if self.config.episodic_life && self.needs_reset && !self.game_over => {
                // SAFETY: live instance.
                unsafe { dws_ale_act(self.handle(), 0) };
            }
            // SAFETY: live instance.
            None => unsafe { dws_ale_reset(self.handle()) },
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
            Action::Discrete(a) if (*a as usize) < self.actions.len() => self.actions[*a as usize],
            _ => {
                return Err(EnvError::InvalidAction {
                    id: self.spec.id.clone(),
                    action: action.clone(),
                    space: self.spec.action_space.to_string(),
                })
            }
        };
        let h = self.handle();
        let skip = self.config.frame_skip as usize;
        let mut reward = 0i64;
        let mut over = false;
        let mut have_prev = false;
        for k in 0..skip {
            // SAFETY: live instance.
            reward += unsafe { dws_ale_act(h, a) } as i64;
            // SAFETY: live instance.
            over = unsafe { dws_ale_game_over(h) } != 0;
            if k + 2 == skip {
                self.grab(1);
                have_prev = true;
            }
            if k + 1 == skip || over {
                self.grab(0);
                break;
            }
        }
        if !have_prev {
            // One screen only (frame skip 1, or the game ended early): pool it with itself.
            let (s0, s1) = self.screens.split_at_mut(1);
            s1[0].copy_from_slice(&s0[0]);
        }
        self.make_frame();
        self.steps += 1;
        // SAFETY: live instance.
        let lives = unsafe { dws_ale_lives(h) };
        let life_lost = self.config.episodic_life && lives < self.lives && lives > 0;
        self.lives = lives;
        self.game_over = over;
        let terminated = over || life_lost;
        let truncated = !terminated
            && self
                .config
                .max_episode_steps
                .is_some_and(|m| self.steps >= m);
        self.needs_reset = terminated || truncated;
        Ok(Step {
            reward: reward as f32,
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
        m.insert("lives".into(), self.lives.into());
        m
    }
}

#[cfg(test)]
mod tests {
    use super::area_weights;

    #[test]
    fn area_weights_sum_to_one() {
        for (src, dst) in [(210, 64), (160, 64), (64, 64)] {
            for w in area_weights(src, dst) {
                let s: f32 = w.iter().map(|(_, x)| x).sum();
                assert!((s - 1.0).abs() < 1e-4, "{src}->{dst}: {s}");
            }
        }
    }
}
