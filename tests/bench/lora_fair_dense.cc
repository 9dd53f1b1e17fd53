// lora_fair_dense: LoRA-FAIR solved the way the paper and its public re-implementations do it, as
// the peer that fedlora's low-rank solver is measured against. It forms the dense ΔW* = Σ p_k s_k
// B_k A_k (m×n) and takes plain gradient steps on ΔB (from 0, lr 0.01, 1000 steps by default) of [1
// − cos(ΔW*, (B̄ + ΔB)·Ā)] + λ‖ΔB‖², every step on dense m×n matrices in f32 (as PyTorch would),
// with Eigen's multithreaded GEMM. It reads the same PEFT directories as `fedlora aggregate`
// (uniform weights) and prints, per module, the objective it reached, evaluated in double.
#include <CLI/CLI.hpp>
#include <chrono>
#include <cstdio>

#include "common/tensor/peft.h"

namespace {

using fedlora::common::MatrixD;
using fedlora::common::MatrixF;

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"LoRA-FAIR by dense gradient descent, as in the paper (benchmark peer)"};
  std::vector<std::string> inputs;
  int steps = 1000;
  float lr = 0.01f, lambda = 0.01f;
  app.add_option("inputs", inputs, "PEFT adapter directories")->required();
  app.add_option("--steps", steps)->capture_default_str();
  app.add_option("--lr", lr)->capture_default_str();
  app.add_option("--lambda", lambda)->capture_default_str();
  CLI11_PARSE(app, argc, argv);

  const auto start = std::chrono::steady_clock::now();
  std::vector<fedlora::common::Adapter> clients;
  for (const std::string& dir : inputs) {
    auto a = fedlora::common::ReadPeftAdapter(dir);
    if (!a.ok()) {
      std::fprintf(stderr, "error: %s\n", std::string(a.status().message()).c_str());
      return 1;
    }
    clients.push_back(*std::move(a));
  }
  const float p = 1.0f / static_cast<float>(clients.size());
  for (size_t i = 0; i < clients[0].num_modules(); ++i) {
    const auto& mod = clients[0].module(i);
    MatrixF target = MatrixF::Zero(mod.out_features, mod.in_features);
    MatrixF a_bar = MatrixF::Zero(mod.rank, mod.in_features),
            b_bar = MatrixF::Zero(mod.out_features, mod.rank);
    for (const auto& c : clients) {
      const float s = static_cast<float>(c.module(i).scaling);
      target.noalias() += (p * s) * c.B(i) * c.A(i);
      a_bar += p * c.A(i);
      b_bar += (p * s) * c.B(i);
    }
    const float target_norm = target.norm();
    MatrixF delta_b = MatrixF::Zero(b_bar.rows(), b_bar.cols()), w(target.rows(), target.cols()),
            grad_w, grad_b;
    for (int step = 0; step < steps; ++step) {
      w.noalias() = (b_bar + delta_b) * a_bar;
      const float w_norm = w.norm();
      const float cos = (w.array() * target.array()).sum() / (w_norm * target_norm);
      // d(1 − cos)/dW = −(ΔW*/(‖ΔW*‖‖W‖) − cos·W/‖W‖²); d/dΔB = that · Āᵀ, plus 2λΔB.
      grad_w = -(target / (target_norm * w_norm) - (cos / (w_norm * w_norm)) * w);
      grad_b.noalias() = grad_w * a_bar.transpose();
      delta_b -= lr * (grad_b + 2 * lambda * delta_b);
    }
    const MatrixD wd = (b_bar + delta_b).cast<double>() * a_bar.cast<double>();
    const MatrixD td = target.cast<double>();
    const double objective = 1 - (wd.array() * td.array()).sum() / (wd.norm() * td.norm()) +
                             lambda * delta_b.cast<double>().squaredNorm();
    std::printf("module %s objective %.9f\n", mod.name.c_str(), objective);
  }
  std::printf("seconds %.3f\n",
              std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  return 0;
}
