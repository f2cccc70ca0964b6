//! Language templates: one short phrase per discrete action, the input of the text encoder
//! (paper, "Action Representation"). Phrases say what the action does in that game where
//! that is known, so actions with the same effect read alike.

/// Procgen's 15 button combinations, in the library's order:
/// LEFT+DOWN, LEFT, LEFT+UP, DOWN, (none), UP, RIGHT+DOWN, RIGHT, RIGHT+UP, D, A, W, S, Q, E.
pub fn procgen(game: &str) -> Vec<String> {
    // Platformers: UP jumps.
    let jumps = matches!(game, "coinrun" | "ninja" | "climber" | "jumper");
    // Games whose first special key (D) does something: shoot, throw, or use.
    let fires = matches!(
        game,
        "bossfight" | "caveflyer" | "dodgeball" | "plunder" | "starpilot" | "ninja"
    );
    let moves: [&str; 9] = if jumps {
        [
            "move left and crouch",
            "move left",
            "jump to the left",
            "crouch",
            "do nothing",
            "jump",
            "move right and crouch",
            "move right",
            "jump to the right",
        ]
    } else {
        [
            "move down and left",
            "move left",
            "move up and left",
            "move down",
            "do nothing",
            "move up",
            "move down and right",
            "move right",
            "move up and right",
        ]
    };
    let special = if fires { "fire" } else { "do nothing" };
    let mut out: Vec<String> = moves.iter().map(|s| s.to_string()).collect();
    out.push(special.to_string());
    // The remaining keys (A, W, S, Q, E) are used by few games; where they do nothing the
    // phrase says so, so the encoder maps them near the no-op.
    for key in ["A", "W", "S", "Q", "E"] {
        let used = matches!(
            (game, key),
            ("starpilot", "A") | ("plunder", "A") | ("dodgeball", "A")
        );
        out.push(if used {
            format!("press {key}")
        } else {
            "do nothing".to_string()
        });
    }
    out
}

/// Atari games dws names (Atari-100k set plus BattleZone, the paper's).
pub const ATARI_GAMES: &[&str] = &[
    "alien",
    "amidar",
    "asteroids",
    "assault",
    "asterix",
    "bank_heist",
    "battle_zone",
    "beam_rider",
    "boxing",
    "breakout",
    "chopper_command",
    "crazy_climber",
    "demon_attack",
    "enduro",
    "freeway",
    "frostbite",
    "gopher",
    "hero",
    "jamesbond",
    "kangaroo",
    "krull",
    "kung_fu_master",
    "montezuma_revenge",
    "ms_pacman",
    "pong",
    "private_eye",
    "qbert",
    "road_runner",
    "seaquest",
    "space_invaders",
    "up_n_down",
];

/// The 18 actions of the full Atari action set, in ALE's order.
pub const ATARI_ACTIONS: [&str; 18] = [
    "do nothing",
    "fire",
    "move up",
    "move right",
    "move left",
    "move down",
    "move up and right",
    "move up and left",
    "move down and right",
    "move down and left",
    "fire while moving up",
    "fire while moving right",
    "fire while moving left",
    "fire while moving down",
    "fire while moving up and right",
    "fire while moving up and left",
    "fire while moving down and right",
    "fire while moving down and left",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_procgen_game_has_fifteen_phrases() {
        for g in crate::procgen::GAMES {
            let t = procgen(g);
            assert_eq!(t.len(), 15, "{g}");
            assert!(t.iter().all(|s| !s.is_empty()));
        }
        assert_eq!(procgen("coinrun")[5], "jump");
        assert_eq!(procgen("maze")[5], "move up");
    }
}
