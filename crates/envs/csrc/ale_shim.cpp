// A small C bridge to the Arcade Learning Environment's C++ interface, compiled only
// with the `atari` cargo feature. Every entry point catches C++ exceptions and reports
// them as an error string, so nothing unwinds into Rust.

#include "ale/ale_interface.hpp"

#include <cstring>
#include <exception>
#include <string>
#include <vector>

namespace {
void set_error(char* err, int cap, const char* msg) {
  if (err && cap > 0) {
    std::strncpy(err, msg, cap - 1);
    err[cap - 1] = '\0';
  }
}
}  // namespace

extern "C" {

// Makes an ALE instance with the ROM loaded, or returns null with a message in `err`.
void* dws_ale_new(const char* rom, int seed, float sticky, char* err, int err_cap) {
  try {
    ale::Logger::setMode(ale::Logger::Error);
    auto* a = new ale::ALEInterface();
    a->setInt("random_seed", seed);
    a->setFloat("repeat_action_probability", sticky);
    a->setInt("frame_skip", 1);
    a->setInt("max_num_frames_per_episode", 0);
    a->loadROM(rom);
    return a;
  } catch (const std::exception& e) {
    set_error(err, err_cap, e.what());
  } catch (...) {
    set_error(err, err_cap, "unknown C++ exception in ALE");
  }
  return nullptr;
}

void dws_ale_free(void* h) { delete static_cast<ale::ALEInterface*>(h); }

// Writes up to `cap` action ids; returns how many there are.
int dws_ale_actions(void* h, int minimal, int* out, int cap) {
  auto* a = static_cast<ale::ALEInterface*>(h);
  ale::ActionVect v = minimal ? a->getMinimalActionSet() : a->getLegalActionSet();
  for (int i = 0; i < (int)v.size() && i < cap; ++i) out[i] = (int)v[i];
  return (int)v.size();
}

int dws_ale_act(void* h, int action) {
  return (int)static_cast<ale::ALEInterface*>(h)->act((ale::Action)action, 1.0f);
}

int dws_ale_game_over(void* h) { return static_cast<ale::ALEInterface*>(h)->game_over(false) ? 1 : 0; }

int dws_ale_lives(void* h) { return static_cast<ale::ALEInterface*>(h)->lives(); }

void dws_ale_reset(void* h) { static_cast<ale::ALEInterface*>(h)->reset_game(); }

int dws_ale_height(void* h) { return (int)static_cast<ale::ALEInterface*>(h)->getScreen().height(); }

int dws_ale_width(void* h) { return (int)static_cast<ale::ALEInterface*>(h)->getScreen().width(); }

// Copies the screen as RGB (height * width * 3 bytes) into `out`.
void dws_ale_screen_rgb(void* h, unsigned char* out) {
  auto* a = static_cast<ale::ALEInterface*>(h);
  thread_local std::vector<unsigned char> buf;
  buf.resize((size_t)a->getScreen().height() * a->getScreen().width() * 3);
  a->getScreenRGB(buf);
  std::memcpy(out, buf.data(), buf.size());
}

}  // extern "C"
