//! Env configs: parsed from an id (`procgen:coinrun`, `push`, `atari:breakout`) plus
//! `key=value` options, stored as JSON beside every dataset.

use crate::{procgen, templates, EnvError, Result};
use serde::{Deserialize, Serialize};

/// A fully specified environment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "family", rename_all = "lowercase")]
pub enum EnvConfig {
    Procgen(ProcgenConfig),
    Push(PushConfig),
    Atari(AtariConfig),
}

/// Procgen options (the names and meanings of procgen's own `ProcgenGym3Env`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProcgenConfig {
    /// One of [`procgen::GAMES`].
    pub game: String,
    /// `easy`, `hard`, `extreme`, `memory` or `exploration`.
    pub distribution_mode: String,
    /// Number of distinct levels (0 = unbounded).
    pub num_levels: u32,
    /// First level seed.
    pub start_level: u32,
    pub use_sequential_levels: bool,
    pub center_agent: bool,
    pub use_backgrounds: bool,
    pub use_monochrome_assets: bool,
    pub restrict_themes: bool,
    pub paint_vel_info: bool,
    /// Truncate episodes after this many steps (the games have their own limits too).
    pub max_episode_steps: Option<u32>,
}

impl Default for ProcgenConfig {
    fn default() -> Self {
        Self {
            game: "coinrun".into(),
            distribution_mode: "easy".into(),
            num_levels: 0,
            start_level: 0,
            use_sequential_levels: false,
            center_agent: true,
            use_backgrounds: true,
            use_monochrome_assets: false,
            restrict_themes: false,
            paint_vel_info: false,
            max_episode_steps: None,
        }
    }
}

/// The robot-pushing task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PushConfig {
    pub min_objects: u32,
    pub max_objects: u32,
    /// Episodes are truncated after this many steps.
    pub max_episode_steps: u32,
    /// End-effector speed at action magnitude 1, in table half-widths per second.
    pub max_speed: f32,
    /// Seconds of simulated time per step.
    pub dt: f32,
    /// Physics sub-steps per env step.
    pub substeps: u32,
    /// The episode terminates when the target object is this close to the goal.
    pub goal_radius: f32,
}

impl Default for PushConfig {
    fn default() -> Self {
        Self {
            min_objects: 2,
            max_objects: 4,
            max_episode_steps: 100,
            max_speed: 1.0,
            dt: 0.1,
            substeps: 2,
            goal_radius: 0.12,
        }
    }
}

/// Atari options (the standard wrappers).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AtariConfig {
    pub game: String,
    pub frame_skip: u32,
    pub sticky_actions: f32,
    pub episodic_life: bool,
    pub full_action_space: bool,
    pub max_episode_steps: Option<u32>,
}

impl Default for AtariConfig {
    fn default() -> Self {
        Self {
            game: "breakout".into(),
            frame_skip: 4,
            sticky_actions: 0.25,
            episodic_life: false,
            full_action_space: false,
            max_episode_steps: Some(27_000),
        }
    }
}

impl EnvConfig {
    /// Parses an id and `key=value` overrides of the family's options.
    pub fn parse(id: &str, options: &[(String, String)]) -> Result<Self> {
        let unknown = |hint: String| EnvError::UnknownEnv {
            id: id.to_string(),
            hint,
        };
        let (family, game) = match id.split_once(':') {
            Some((f, g)) => (f, Some(g)),
            None => (id, None),
        };
        let mut value =
            match (family, game) {
                ("procgen", Some(g)) => {
                    if !procgen::GAMES.contains(&g) {
                        return Err(unknown(format!(
                            "Procgen has no game `{g}`; games: {}",
                            procgen::GAMES.join(", ")
                        )));
                    }
                    serde_json::to_value(EnvConfig::Procgen(ProcgenConfig {
                        game: g.into(),
                        ..Default::default()
                    }))
                }
                ("push", None) => serde_json::to_value(EnvConfig::Push(PushConfig::default())),
                ("atari", Some(g)) => {
                    if !templates::ATARI_GAMES.contains(&g) {
                        return Err(unknown(format!(
                            "no Atari game `{g}`; games: {}",
                            templates::ATARI_GAMES.join(", ")
                        )));
                    }
                    serde_json::to_value(EnvConfig::Atari(AtariConfig {
                        game: g.into(),
                        ..Default::default()
                    }))
                }
                _ => return Err(unknown(
                    "ids look like procgen:coinrun, push or atari:breakout (`dws envs` lists them)"
                        .into(),
                )),
            }
            .expect("configs serialise");
        let obj = value.as_object_mut().expect("configs are objects");
        for (key, raw) in options {
            if key == "family" || key == "game" {
                return Err(EnvError::BadOption {
                    id: id.into(),
                    detail: format!("`{key}` is set by the id itself"),
                });
            }
            obj.insert(key.clone(), guess_json(raw));
        }
        let config: EnvConfig = serde_json::from_value(value).map_err(|e| EnvError::BadOption {
            id: id.into(),
            detail: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// The id this config was parsed from.
    pub fn id(&self) -> String {
        match self {
            EnvConfig::Procgen(c) => format!("procgen:{}", c.game),
            EnvConfig::Push(_) => "push".into(),
            EnvConfig::Atari(c) => format!("atari:{}", c.game),
        }
    }

    fn validate(&self) -> Result<()> {
        let bad = |detail: String| {
            Err(EnvError::BadOption {
                id: self.id(),
                detail,
            })
        };
        match self {
            EnvConfig::Procgen(c) => {
                if procgen::distribution_mode(&c.distribution_mode).is_none() {
                    return bad(format!(
                        "distribution_mode `{}` is not one of easy, hard, extreme, memory, exploration",
                        c.distribution_mode
                    ));
                }
            }
            EnvConfig::Push(c) => {
                if c.min_objects < 1 || c.min_objects > c.max_objects || c.max_objects > 6 {
                    return bad("need 1 <= min_objects <= max_objects <= 6".into());
                }
                if c.max_episode_steps == 0 || c.substeps == 0 {
                    return bad("max_episode_steps and substeps must be at least 1".into());
                }
                if !(c.dt > 0.0 && c.max_speed > 0.0 && c.goal_radius > 0.0) {
                    return bad("dt, max_speed and goal_radius must be positive".into());
                }
            }
            EnvConfig::Atari(c) => {
                if !(0.0..=1.0).contains(&c.sticky_actions) || c.frame_skip == 0 {
                    return bad("sticky_actions must be in [0, 1] and frame_skip >= 1".into());
                }
            }
        }
        Ok(())
    }
}

/// `200` → number, `true` → bool, anything else → string.
fn guess_json(raw: &str) -> serde_json::Value {
    serde_json::from_str(raw).unwrap_or_else(|_| serde_json::Value::String(raw.to_string()))
}

/// Parses `a=1,b=easy` into pairs.
pub fn parse_options(text: &str) -> std::result::Result<Vec<(String, String)>, String> {
    text.split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                .ok_or_else(|| format!("option `{kv}` is not key=value"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ids_and_options() {
        let c = EnvConfig::parse(
            "procgen:ninja",
            &parse_options("num_levels=200,distribution_mode=hard").unwrap(),
        )
        .unwrap();
        match &c {
            EnvConfig::Procgen(p) => {
                assert_eq!(p.game, "ninja");
                assert_eq!(p.num_levels, 200);
                assert_eq!(p.distribution_mode, "hard");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(c.id(), "procgen:ninja");
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<EnvConfig>(&json).unwrap(), c);
    }

    #[test]
    fn unknown_ids_and_options_are_named() {
        for id in ["procgen:nope", "nope", "push:x", "atari:nope"] {
            let msg = EnvConfig::parse(id, &[]).unwrap_err().to_string();
            assert!(msg.contains(id), "{msg}");
        }
        let msg = EnvConfig::parse("push", &[("colour".into(), "red".into())])
            .unwrap_err()
            .to_string();
        assert!(msg.contains("colour") && msg.contains("push"), "{msg}");
        let msg = EnvConfig::parse(
            "procgen:coinrun",
            &[("distribution_mode".into(), "medium".into())],
        )
        .unwrap_err()
        .to_string();
        assert!(msg.contains("medium"), "{msg}");
        assert!(parse_options("a=1,b").is_err());
    }
}
