#include "common/secagg/params.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "common/base/strings.h"
#include "common/secagg/crypto.h"
#include "common/secagg/dp.h"

namespace fedlora::secagg {
namespace {

using common::StrCat;

constexpr double kSecurityBits = 41;     // per bad event (two of them): 2^−40 in all
constexpr double kCorrectnessBits = 20;  // a round fails to unmask with probability ≤ 2^−20
constexpr double kSmall = 1e-14;         // keeps n·rate from rounding the unsafe way

// log C(n, k)
double LogChoose(int n, int k) {
  return std::lgamma(n + 1.0) - std::lgamma(k + 1.0) - std::lgamma(n - k + 1.0);
}

// P(X = x) for X hypergeometric: `draws` from `population` of which `marked` are marked.
double HypergeometricPmf(int population, int marked, int draws, int x) {
  if (x < 0 || x > marked || x > draws || draws - x > population - marked) return 0;
  return std::exp(LogChoose(marked, x) + LogChoose(population - marked, draws - x) -
                  LogChoose(population, draws));
}

// log of a union bound on the probability that the ring loses its connectivity once `bad` clients
// (corrupt or dropped, at random places) are taken out: that needs two runs of k/2 consecutive bad
// clients, at one of n·(n − k − 1)/2 pairs of places, each all bad with probability
// bad!/(bad − k)! · (n − k)!/n!.
double LogDisconnected(int n, int k, int bad) {
  if (k > bad) return -std::numeric_limits<double>::infinity();
  return std::log(n) + std::log(n - k - 1.0) - std::log(2.0) + std::lgamma(bad + 1.0) +
         std::lgamma(n - k + 1.0) - std::lgamma(n + 1.0) - std::lgamma(bad - k + 1.0);
}

// The threshold of degree k when it is secure and correct; 0 when it is not.
int ThresholdFor(int n, int k, int corrupt, int survivors) {
  if (LogDisconnected(n, k, corrupt + n - survivors) >= -kSecurityBits * std::log(2.0)) return 0;
  const int holders = k + 1;
  // Smallest t with P(corrupt holders ≥ t) ≤ 2^−41/n.
  const double security = std::pow(2.0, -kSecurityBits) / n;
  int t = holders + 1;
  double tail = 0;
  while (t > 0 && tail + HypergeometricPmf(n, corrupt, holders, t - 1) <= security)
    tail += HypergeometricPmf(n, corrupt, holders, --t);
  // t − 1 corrupt holders at most: two sets of t holders must share an honest one.
  t = std::max({t, (holders + t - 1) / 2 + 1, 2});
  // P(surviving holders < t) ≤ 2^−20/n.
  double short_of = 0;
  for (int x = 0; x < t; ++x) short_of += HypergeometricPmf(n, survivors, holders, x);
  return t <= holders && short_of <= std::pow(2.0, -kCorrectnessBits) / n ? t : 0;
}

}  // namespace

absl::StatusOr<GraphParams> ChooseGraph(int clients, double dropout, double corrupt) {
  if (clients < 3)
    return absl::InvalidArgumentError(
        StrCat("secure aggregation needs a cohort of at least 3 clients; got ", clients,
               " (with two, each learns the other's update from the sum)"));
  if (clients > 65535)
    return absl::InvalidArgumentError(
        StrCat("secure aggregation takes at most 65535 clients per round; got ", clients));
  if (!(dropout >= 0 && dropout < 1) || !(corrupt >= 0 && corrupt < 1))
    return absl::InvalidArgumentError(
        StrCat("the dropout and corrupt rates must be in [0, 1); got ", dropout, " and ", corrupt));
  if (corrupt + 2 * dropout > 0.9)
    return absl::InvalidArgumentError(
        StrCat("no secure graph exists for corrupt rate ", corrupt, " and dropout rate ", dropout,
               ": against a semi-malicious coordinator they need corrupt + 2·dropout ≤ 0.9"));
  const int n = clients;
  const int corrupt_count = static_cast<int>(std::floor((corrupt + kSmall) * n));
  const int survivors = n - static_cast<int>(std::ceil((dropout - kSmall) * n));  // ≥ 1 drops
  for (int k = 2; k < n - 1; k += 2) {
    if (const int t = ThresholdFor(n, k, corrupt_count, survivors); t > 0)
      return GraphParams{n, k, t};
  }
  return GraphParams{n, n - 1, std::max(2, (n + corrupt_count) / 2 + 1)};
}

absl::StatusOr<std::vector<int>> RingOrder(int clients, std::string_view seed) {
  std::vector<uint64_t> words(static_cast<size_t>(std::max(clients, 1)));
  if (absl::Status st = ExpandSeed(seed, 64, words); !st.ok()) return st;
  std::vector<int> at(static_cast<size_t>(clients));  // the client at each place
  for (int i = 0; i < clients; ++i) at[i] = i;
  for (int i = clients - 1; i > 0; --i)  // Fisher–Yates (the modulo's bias is below 2^−48)
    std::swap(at[i], at[words[i] % static_cast<uint64_t>(i + 1)]);
  std::vector<int> position(at.size());
  for (int p = 0; p < clients; ++p) position[at[p]] = p;
  return position;
}

std::vector<int> Neighbours(const GraphParams& graph, const std::vector<int>& ring_position,
                            int client) {
  const int n = graph.clients;
  std::vector<int> out;
  if (graph.complete()) {
    for (int v = 0; v < n; ++v)
      if (v != client) out.push_back(v);
    return out;
  }
  std::vector<int> at(static_cast<size_t>(n));
  for (int v = 0; v < n; ++v) at[ring_position[v]] = v;
  const int p = ring_position[client];
  for (int d = 1; d <= graph.neighbours / 2; ++d) {
    out.push_back(at[(p + d) % n]);
    out.push_back(at[(p - d + n) % n]);
  }
  std::sort(out.begin(), out.end());
  return out;
}

double Quantisation::local_sigma() const {
  return std::sqrt(static_cast<double>(noise_num) / static_cast<double>(noise_den));
}

double Quantisation::l2_sensitivity() const {
  return clip * scale + std::sqrt(static_cast<double>(rotated));
}

std::string Quantisation::Describe() const {
  return StrCat(length, " values rotated to ", rotated, ", clip ", clip, ", scale ", scale,
                ", each within ±", clamp,
                noise_num ? StrCat(", local noise σ ", local_sigma()) : std::string(", no noise"),
                "; a sum of ", summands, " in ", bits, " bits");
}

absl::StatusOr<Quantisation> PlanQuantisation(size_t length, double clip, double noise_multiplier,
                                              double expected_clients, int summands) {
  if (length == 0 || !(clip > 0) || !std::isfinite(clip) || !(noise_multiplier >= 0) ||
      !std::isfinite(noise_multiplier) || !(expected_clients >= 1) || summands < 1)
    return absl::InvalidArgumentError(StrCat(
        "cannot quantise ", length, " values with clip ", clip, ", noise multiplier ",
        noise_multiplier, ", ", expected_clients, " expected clients and ", summands, " summands"));
  Quantisation q;
  q.length = length;
  q.rotated = RotatedLength(length);
  q.clip = clip;
  q.summands = summands;
  const double rotated = static_cast<double>(q.rotated);
  q.scale = std::ldexp(std::sqrt(rotated), 16) / clip;
  const double local_sigma = noise_multiplier * clip / std::sqrt(expected_clients);
  if (local_sigma > 0) q.scale = std::min(q.scale, std::ldexp(1.0, 20) / local_sigma);
  // A coordinate of H·D·x/√D is a Rademacher sum: |it| > u·‖x‖ with probability at most
  // 2·exp(−rotated·u²/2) (Hoeffding), 2^−40/rotated at u below.
  const double log_tail = (kSecurityBits * std::log(2.0) + std::log(rotated));
  const double u = std::sqrt(2 * log_tail / rotated);
  q.clamp = static_cast<int64_t>(std::ceil(q.scale * clip * std::min(1.0, u))) + 1;
  double noise_tail = 0;
  if (local_sigma > 0) {
    const double variance = std::pow(local_sigma * q.scale, 2);
    q.noise_den = 1 << 16;
    q.noise_num = static_cast<uint64_t>(std::llround(std::max(variance, 1.0) * 65536.0));
    noise_tail = std::sqrt(2 * summands * q.local_sigma() * q.local_sigma() * log_tail);
  }
  const double largest = static_cast<double>(summands) * static_cast<double>(q.clamp) + noise_tail;
  q.bits = static_cast<int>(std::ceil(std::log2(largest + 1))) + 1;
  if (q.bits > 62)
    return absl::InvalidArgumentError(StrCat(
        "a sum of ", summands, " clients' updates needs ", q.bits,
        " bits per value under secure aggregation; at most 62 are supported (clip ", clip, ")"));
  return q;
}

}  // namespace fedlora::secagg
