//! A robot-pushing task standing in for the BAIR robot-pushing data (which cannot be
//! downloaded here): seen from above, an arm's end-effector moves over a table with
//! continuous 2-D velocity actions and pushes 2-4 objects of random shapes and colours.
//! Physics by rapier2d (no gravity: the table plane; damping plays friction). Object 0 is
//! the target; its goal is drawn as a ring; reward is minus the target's distance to the
//! goal, and the episode terminates when the target is inside the goal radius.
//!
//! World coordinates: the table spans [-1, 1]² with y pointing down the image; the arm's
//! base sits above the top edge.

use crate::{Action, ActionSpace, Env, EnvError, EnvSpec, PushConfig, Result, Step, FRAME};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rapier2d::prelude::*;
use std::any::Any;

/// Gripper radius and arm half-width (table half-widths). The arm is drawn 5 pixels wide
/// and the gripper 8, wider than the up to 3.2 pixels it moves per step, so consecutive
/// frames overlap, which is what a video model's warp learns motion from. With the thinner
/// arm of earlier datasets (3 and 6 pixels) the `small` DWS model gained half as much
/// over no actions on the moving pixels (README, "Status").
const EE_RADIUS: f32 = 0.12;
const ARM_BASE: [f32; 2] = [0.0, -1.25];
const ARM_HALF_WIDTH: f32 = 0.08;
const OBJECT_DAMPING: f32 = 6.0;
const TABLE: f32 = 1.0;
/// The end-effector stays this far inside the table edge.
const EE_LIMIT: f32 = TABLE - EE_RADIUS;

const PALETTE: [[u8; 3]; 8] = [
    [200, 40, 40],
    [40, 110, 210],
    [40, 160, 60],
    [230, 170, 20],
    [150, 60, 180],
    [20, 170, 170],
    [230, 110, 30],
    [120, 80, 40],
];

/// Object outline: a circle or a convex polygon (local vertices, counter-clockwise).
#[derive(Clone, Debug)]
enum Shape {
    Circle(f32),
    Polygon(Vec<[f32; 2]>),
}

#[derive(Clone, Debug)]
struct Object {
    body: RigidBodyHandle,
    shape: Shape,
    colour: [u8; 3],
}

struct World {
    pipeline: PhysicsPipeline,
    params: IntegrationParameters,
    islands: IslandManager,
    broad_phase: DefaultBroadPhase,
    narrow_phase: NarrowPhase,
    bodies: RigidBodySet,
    colliders: ColliderSet,
    impulse_joints: ImpulseJointSet,
    multibody_joints: MultibodyJointSet,
    ccd: CCDSolver,
    ee: RigidBodyHandle,
    objects: Vec<Object>,
}

/// The pushing task.
pub struct PushEnv {
    config: PushConfig,
    spec: EnvSpec,
    world: Option<World>,
    goal: [f32; 2],
    /// Table, goal ring: drawn once per episode.
    background: Vec<u8>,
    frame: Vec<u8>,
    steps: u32,
    needs_reset: bool,
    /// Seeds episodes reset with `None`.
    episode_rng: ChaCha8Rng,
}

impl PushEnv {
    pub fn new(config: PushConfig) -> Self {
        let spec = EnvSpec {
            id: "push".into(),
            action_space: ActionSpace::Continuous {
                dim: 2,
                low: -1.0,
                high: 1.0,
            },
            frame_shape: [FRAME, FRAME, 3],
            action_templates: Vec::new(),
            final_frame_rendered: true,
        };
        Self {
            config,
            spec,
            world: None,
            goal: [0.0; 2],
            background: vec![0; FRAME * FRAME * 3],
            frame: vec![0; FRAME * FRAME * 3],
            steps: 0,
            needs_reset: true,
            episode_rng: ChaCha8Rng::seed_from_u64(0),
        }
    }

    /// End-effector position (world coordinates).
    pub fn ee_position(&self) -> [f32; 2] {
        let w = self.world.as_ref().expect("reset before use");
        let t = w.bodies[w.ee].translation();
        [t.x, t.y]
    }

    /// Object centres (world coordinates); index 0 is the target.
    pub fn object_positions(&self) -> Vec<[f32; 2]> {
        let w = self.world.as_ref().expect("reset before use");
        w.objects
            .iter()
            .map(|o| {
                let t = w.bodies[o.body].translation();
                [t.x, t.y]
            })
            .collect()
    }

    pub fn goal(&self) -> [f32; 2] {
        self.goal
    }

    /// Distance between the end-effector limit and the table edge, for policies.
    pub fn ee_limit(&self) -> f32 {
        EE_LIMIT
    }

    pub fn config(&self) -> &PushConfig {
        &self.config
    }

    fn target_distance(&self) -> f32 {
        let p = self.object_positions()[0];
        ((p[0] - self.goal[0]).powi(2) + (p[1] - self.goal[1]).powi(2)).sqrt()
    }

    fn build(&mut self, rng: &mut ChaCha8Rng) {
        let mut bodies = RigidBodySet::new();
        let mut colliders = ColliderSet::new();
        // Walls just outside the table keep objects on it.
        for (x, y, hx, hy) in [
            (0.0, -TABLE - 0.1, TABLE + 0.2, 0.1),
            (0.0, TABLE + 0.1, TABLE + 0.2, 0.1),
            (-TABLE - 0.1, 0.0, 0.1, TABLE + 0.2),
            (TABLE + 0.1, 0.0, 0.1, TABLE + 0.2),
        ] {
            colliders.insert(
                ColliderBuilder::cuboid(hx, hy)
                    .translation(vector![x, y])
                    .build(),
            );
        }
        let n = rng.gen_range(self.config.min_objects..=self.config.max_objects) as usize;
        let mut placed: Vec<([f32; 2], f32)> = Vec::new();
        let ee_start = [rng.gen_range(-0.6..0.6), rng.gen_range(-0.8..-0.4)];
        placed.push((ee_start, EE_RADIUS));
        let mut colours: Vec<usize> = (0..PALETTE.len()).collect();
        let mut objects = Vec::with_capacity(n);
        for _ in 0..n {
            let size = rng.gen_range(0.13..0.2f32);
            let shape = match rng.gen_range(0..4) {
                0 => Shape::Circle(size),
                1 => {
                    let a = size * rng.gen_range(0.7..1.0f32);
                    let b = size * rng.gen_range(0.7..1.0f32);
                    Shape::Polygon(vec![[-a, -b], [a, -b], [a, b], [-a, b]])
                }
                k => {
                    let sides = if k == 2 { 3 } else { 5 };
                    Shape::Polygon(
                        (0..sides)
                            .map(|i| {
                                let t = i as f32 / sides as f32 * std::f32::consts::TAU;
                                [size * t.cos(), size * t.sin()]
                            })
                            .collect(),
                    )
                }
            };
            // Rejection sampling for a free spot (falls back to the last try).
            let mut pos = [0.0f32; 2];
            for _ in 0..100 {
                pos = [rng.gen_range(-0.7..0.7), rng.gen_range(-0.5..0.75)];
                if placed.iter().all(|(p, r)| {
                    ((p[0] - pos[0]).powi(2) + (p[1] - pos[1]).powi(2)).sqrt() > r + size + 0.05
                }) {
                    break;
                }
            }
            placed.push((pos, size));
            let angle = rng.gen_range(0.0..std::f32::consts::TAU);
            let colour = PALETTE[colours.swap_remove(rng.gen_range(0..colours.len()))];
            let body = bodies.insert(
                RigidBodyBuilder::dynamic()
                    .translation(vector![pos[0], pos[1]])
                    .rotation(angle)
                    .linear_damping(OBJECT_DAMPING)
                    .angular_damping(OBJECT_DAMPING)
                    .build(),
            );
            let collider = match &shape {
                Shape::Circle(r) => ColliderBuilder::ball(*r),
                Shape::Polygon(v) => {
                    let pts: Vec<Point<Real>> = v.iter().map(|p| point![p[0], p[1]]).collect();
                    ColliderBuilder::convex_hull(&pts).expect("regular polygons are convex")
                }
            }
            .density(1.0)
            .friction(0.3)
            .restitution(0.0)
            .build();
            colliders.insert_with_parent(collider, body, &mut bodies);
            objects.push(Object {
                body,
                shape,
                colour,
            });
        }
        let ee = bodies.insert(
            RigidBodyBuilder::kinematic_velocity_based()
                .translation(vector![ee_start[0], ee_start[1]])
                .build(),
        );
        colliders.insert_with_parent(ColliderBuilder::ball(EE_RADIUS).build(), ee, &mut bodies);
        // Goal: somewhere away from the target's start.
        let target = placed[1].0;
        let mut goal = [0.0f32; 2];
        for _ in 0..100 {
            goal = [rng.gen_range(-0.7..0.7), rng.gen_range(-0.6..0.75)];
            if ((goal[0] - target[0]).powi(2) + (goal[1] - target[1]).powi(2)).sqrt() > 0.4 {
                break;
            }
        }
        self.goal = goal;
        let params = IntegrationParameters {
            dt: self.config.dt / self.config.substeps as f32,
            ..Default::default()
        };
        self.world = Some(World {
            pipeline: PhysicsPipeline::new(),
            params,
            islands: IslandManager::new(),
            broad_phase: DefaultBroadPhase::new(),
            narrow_phase: NarrowPhase::new(),
            bodies,
            colliders,
            impulse_joints: ImpulseJointSet::new(),
            multibody_joints: MultibodyJointSet::new(),
            ccd: CCDSolver::new(),
            ee,
            objects,
        });
        self.draw_background(rng);
    }

    fn draw_background(&mut self, rng: &mut ChaCha8Rng) {
        // A light table with a little per-episode tint and a fixed wood-like grain.
        let base = [
            rng.gen_range(190..215u8) as f32,
            rng.gen_range(175..200u8) as f32,
            rng.gen_range(150..175u8) as f32,
        ];
        for y in 0..FRAME {
            for x in 0..FRAME {
                let grain = ((y as f32 * 0.9 + (x as f32 * 0.21).sin() * 2.0).sin() * 5.0) as i32;
                let i = (y * FRAME + x) * 3;
                for (px, b) in self.background[i..i + 3].iter_mut().zip(base) {
                    *px = (b as i32 + grain).clamp(0, 255) as u8;
                }
            }
        }
        // Goal ring in a darkened target colour.
        let colour = self.world.as_ref().expect("built").objects[0].colour;
        let ring = colour.map(|c| (c as f32 * 0.6) as u8);
        let (gx, gy) = to_pixel(self.goal);
        let r_out = self.config.goal_radius * FRAME as f32 / 2.0;
        let r_in = r_out - 1.5;
        fill(
            &mut self.background,
            gx,
            gy,
            r_out,
            |dx, dy| {
                let d = (dx * dx + dy * dy).sqrt();
                d <= r_out && d >= r_in
            },
            ring,
        );
    }

    fn render(&mut self) {
        self.frame.copy_from_slice(&self.background);
        let w = self.world.as_ref().expect("built");
        for o in &w.objects {
            let body = &w.bodies[o.body];
            let t = body.translation();
            let (cx, cy) = to_pixel([t.x, t.y]);
            let scale = FRAME as f32 / 2.0;
            match &o.shape {
                Shape::Circle(r) => {
                    let rp = r * scale;
                    fill(
                        &mut self.frame,
                        cx,
                        cy,
                        rp,
                        |dx, dy| dx * dx + dy * dy <= rp * rp,
                        o.colour,
                    );
                }
                Shape::Polygon(v) => {
                    let (s, c) = body.rotation().angle().sin_cos();
                    let pts: Vec<[f32; 2]> = v
                        .iter()
                        .map(|p| [(c * p[0] - s * p[1]) * scale, (s * p[0] + c * p[1]) * scale])
                        .collect();
                    let reach = pts.iter().map(|p| p[0].hypot(p[1])).fold(0.0, f32::max);
                    fill(
                        &mut self.frame,
                        cx,
                        cy,
                        reach,
                        |dx, dy| inside_convex(&pts, dx, dy),
                        o.colour,
                    );
                }
            }
        }
        // The arm: a grey bar from the base to the end-effector, then the gripper disc.
        let ee = w.bodies[w.ee].translation();
        let (bx, by) = to_pixel(ARM_BASE);
        let (ex, ey) = to_pixel([ee.x, ee.y]);
        let half = ARM_HALF_WIDTH * FRAME as f32 / 2.0;
        draw_segment(&mut self.frame, (bx, by), (ex, ey), half, [120, 120, 128]);
        let rp = EE_RADIUS * FRAME as f32 / 2.0;
        fill(
            &mut self.frame,
            ex,
            ey,
            rp,
            |dx, dy| dx * dx + dy * dy <= rp * rp,
            [60, 60, 66],
        );
        let ri = rp * 0.45;
        fill(
            &mut self.frame,
            ex,
            ey,
            ri,
            |dx, dy| dx * dx + dy * dy <= ri * ri,
            [170, 170, 180],
        );
    }
}

fn to_pixel(p: [f32; 2]) -> (f32, f32) {
    let s = FRAME as f32 / 2.0;
    ((p[0] + TABLE) * s, (p[1] + TABLE) * s)
}

/// Paints every pixel whose centre lies within `reach` of (cx, cy) and passes `inside`
/// (called with the offset from the centre, in pixels).
fn fill(
    frame: &mut [u8],
    cx: f32,
    cy: f32,
    reach: f32,
    inside: impl Fn(f32, f32) -> bool,
    colour: [u8; 3],
) {
    let lo = |v: f32| ((v - reach - 0.5).floor().max(0.0)) as usize;
    let hi = |v: f32| ((v + reach + 0.5).ceil().min(FRAME as f32)) as usize;
    for y in lo(cy)..hi(cy) {
        let dy = y as f32 + 0.5 - cy;
        for x in lo(cx)..hi(cx) {
            let dx = x as f32 + 0.5 - cx;
            if inside(dx, dy) {
                let i = (y * FRAME + x) * 3;
                frame[i..i + 3].copy_from_slice(&colour);
            }
        }
    }
}

fn inside_convex(pts: &[[f32; 2]], x: f32, y: f32) -> bool {
    (0..pts.len()).all(|i| {
        let a = pts[i];
        let b = pts[(i + 1) % pts.len()];
        (b[0] - a[0]) * (y - a[1]) - (b[1] - a[1]) * (x - a[0]) >= 0.0
    })
}

fn draw_segment(frame: &mut [u8], a: (f32, f32), b: (f32, f32), half: f32, colour: [u8; 3]) {
    let (x0, x1) = (a.0.min(b.0) - half, a.0.max(b.0) + half);
    let (y0, y1) = (a.1.min(b.1) - half, a.1.max(b.1) + half);
    let (dx, dy) = (b.0 - a.0, b.1 - a.1);
    let len2 = (dx * dx + dy * dy).max(1e-6);
    for y in (y0.floor().max(0.0) as usize)..(y1.ceil().min(FRAME as f32) as usize) {
        for x in (x0.floor().max(0.0) as usize)..(x1.ceil().min(FRAME as f32) as usize) {
            let (px, py) = (x as f32 + 0.5 - a.0, y as f32 + 0.5 - a.1);
            let t = ((px * dx + py * dy) / len2).clamp(0.0, 1.0);
            let (ox, oy) = (px - t * dx, py - t * dy);
            if ox * ox + oy * oy <= half * half {
                let i = (y * FRAME + x) * 3;
                frame[i..i + 3].copy_from_slice(&colour);
            }
        }
    }
}

impl Env for PushEnv {
    fn spec(&self) -> &EnvSpec {
        &self.spec
    }

    fn reset(&mut self, seed: Option<u64>) -> Result<()> {
        let seed = seed.unwrap_or_else(|| self.episode_rng.gen());
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        self.episode_rng = ChaCha8Rng::seed_from_u64(rng.gen());
        self.build(&mut rng);
        self.steps = 0;
        self.needs_reset = false;
        self.render();
        Ok(())
    }

    fn step(&mut self, action: &Action) -> Result<Step> {
        if self.needs_reset {
            return Err(EnvError::NeedsReset {
                id: self.spec.id.clone(),
            });
        }
        if !self.spec.action_space.contains(action) {
            return Err(EnvError::InvalidAction {
                id: self.spec.id.clone(),
                action: action.clone(),
                space: self.spec.action_space.to_string(),
            });
        }
        let Action::Continuous(v) = action else {
            unreachable!("checked by contains")
        };
        let speed = self.config.max_speed;
        let w = self.world.as_mut().expect("reset made the world");
        for _ in 0..self.config.substeps {
            let h = w.params.dt;
            let ee = w.bodies[w.ee].translation();
            // Stop at the table's edge.
            let mut vel = [v[0] * speed, v[1] * speed];
            for (k, p) in [ee.x, ee.y].iter().enumerate() {
                let next = p + vel[k] * h;
                if next.abs() > EE_LIMIT {
                    vel[k] = (EE_LIMIT.copysign(next) - p) / h;
                }
            }
            w.bodies[w.ee].set_linvel(vector![vel[0], vel[1]], true);
            w.pipeline.step(
                &vector![0.0, 0.0],
                &w.params,
                &mut w.islands,
                &mut w.broad_phase,
                &mut w.narrow_phase,
                &mut w.bodies,
                &mut w.colliders,
                &mut w.impulse_joints,
                &mut w.multibody_joints,
                &mut w.ccd,
                None,
                &(),
                &(),
            );
        }
        self.steps += 1;
        self.render();
        let dist = self.target_distance();
        let terminated = dist < self.config.goal_radius;
        let truncated = !terminated && self.steps >= self.config.max_episode_steps;
        self.needs_reset = terminated || truncated;
        Ok(Step {
            reward: -dist,
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
        if let Some(w) = &self.world {
            m.insert("num_objects".into(), w.objects.len().into());
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(seed: u64, steps: usize) -> Vec<u8> {
        let mut env = PushEnv::new(PushConfig::default());
        env.reset(Some(seed)).unwrap();
        let mut out = env.obs().to_vec();
        for i in 0..steps {
            let a = Action::Continuous(vec![(i as f32 * 0.3).sin(), 0.8]);
            if env.step(&a).unwrap().done() {
                break;
            }
            out.extend_from_slice(env.obs());
        }
        out
    }

    #[test]
    fn same_seed_same_frames_other_seed_differs() {
        assert_eq!(run(7, 30), run(7, 30));
        assert_ne!(run(7, 30), run(8, 30));
    }

    #[test]
    fn the_arm_pushes_objects() {
        // Drive the end-effector straight through the target and check it moved.
        let mut env = PushEnv::new(PushConfig {
            min_objects: 1,
            max_objects: 1,
            ..Default::default()
        });
        env.reset(Some(3)).unwrap();
        let start = env.object_positions()[0];
        let mut moved = false;
        for _ in 0..60 {
            let ee = env.ee_position();
            let obj = env.object_positions()[0];
            let (dx, dy) = (obj[0] - ee[0], obj[1] - ee[1]);
            let n = (dx * dx + dy * dy).sqrt().max(1e-3);
            let step = env.step(&Action::Continuous(vec![dx / n, dy / n])).unwrap();
            let now = env.object_positions()[0];
            if ((now[0] - start[0]).powi(2) + (now[1] - start[1]).powi(2)).sqrt() > 0.1 {
                moved = true;
                break;
            }
            if step.done() {
                break;
            }
        }
        assert!(moved, "the target never moved");
    }

    #[test]
    fn bad_actions_are_refused() {
        let mut env = PushEnv::new(PushConfig::default());
        assert!(matches!(
            env.step(&Action::Continuous(vec![0.0, 0.0])),
            Err(EnvError::NeedsReset { .. })
        ));
        env.reset(Some(1)).unwrap();
        for bad in [
            Action::Discrete(0),
            Action::Continuous(vec![0.0]),
            Action::Continuous(vec![2.0, 0.0]),
            Action::Continuous(vec![f32::NAN, 0.0]),
        ] {
            assert!(matches!(
                env.step(&bad),
                Err(EnvError::InvalidAction { .. })
            ));
        }
    }
}
