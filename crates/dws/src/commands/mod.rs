pub mod assets;
pub mod bench;
pub mod collect;
pub mod dataset;
pub mod envs;
pub mod predict;
pub mod quickstart;
pub mod world;
