// The coordinator's HTTP listener (--metrics-listen): Debian's real Prometheus server scraping a
// live federation, the live page as headless Chromium renders it during and after the run, and who
// may read either off the loopback interface (real TLS, real certificates).
#include <unistd.h>

#include <regex>

#include "server/observe/listener.h"
#include "server/server_options.h"
#include "tests/e2e/federation_fixture.h"

// After Eigen's headers: httplib.h brings <resolv.h>, whose macros break Eigen's templates.
#include <httplib.h>

namespace fedlora::testing {
namespace {

// `name` on PATH, or "".
std::string Which(const std::string& name) {
  std::stringstream path(getenv("PATH") ? getenv("PATH") : "/usr/bin:/bin");
  for (std::string dir; std::getline(path, dir, ':');) {
    const std::string file = dir + "/" + name;
    if (access(file.c_str(), X_OK) == 0) return file;
  }
  return "";
}

// The text of `page`'s cell of class `cls` in the row with `attr`="value"; "" when there is none.
std::string Cell(const std::string& page, const std::string& attr, const std::string& value,
                 const std::string& cls) {
  const std::regex row("<tr[^>]* " + attr + "=\"" + value + "\"[^>]*>(.*?)</tr>");
  std::smatch m;
  if (!std::regex_search(page, m, row)) return "";
  const std::string cells = m[1];
  const std::regex cell("<td class=\"" + cls + "\">([^<]*)</td>");
  return std::regex_search(cells, m, cell) ? std::string(m[1]) : "";
}

// The number of an element's text (id="..."), or NaN.
double ById(const std::string& page, const std::string& id) {
  std::smatch m;
  if (!std::regex_search(page, m, std::regex("id=\"" + id + "\">([^<]*)<"))) return NAN;
  return std::stod(m[1]);
}

class ObserveTest : public LlmFixture {
 protected:
  void SetUp() override {
    LlmFixture::SetUp();
    prometheus_ = Which("prometheus");
    chromium_ = Which("chromium");
  }

  // The page's DOM after its scripts ran: Chromium's virtual time lets its fetch finish.
  std::string PageDom(int port) {
    const CommandResult r = RunProgram({chromium_, "--headless", "--no-sandbox", "--disable-gpu",
                                        "--virtual-time-budget=4000", "--dump-dom",
                                        "http://127.0.0.1:" + std::to_string(port) + "/"});
    EXPECT_EQ(r.exit_code, 0) << r.output;
    return r.output;
  }

  // The value Prometheus's HTTP API gives `query` (an instant vector of one sample), "" without.
  static std::string Query(int port, const std::string& query) {
    httplib::Client api("127.0.0.1", port);
    const auto res = api.Get("/api/v1/query", {{"query", query}}, httplib::Headers{});
    if (!res || res->status != 200) return "";
    const nlohmann::json j = nlohmann::json::parse(res->body, nullptr, false);
    if (!j.contains("data") || j["data"]["result"].empty()) return "";
    return j["data"]["result"][0]["value"][1];
  }
  // Query's value once it is `want` (Prometheus scrapes every second), or the last one after 60 s.
  static std::string QueryOnce(int port, const std::string& query, const std::string& want) {
    std::string value;
    for (int t = 0; t < 600 && (value = Query(port, query)) != want; ++t)
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    return value;
  }

  std::string prometheus_, chromium_;
};

TEST_F(ObserveTest, PrometheusAndThePageShowWhatMetricsJsonlSays) {
  if (prometheus_.empty() || chromium_.empty()) {
    GTEST_SKIP() << "needs Debian's prometheus and chromium (deploy/install_deps.sh installs them; "
                    "their packages could not be installed here)";
  }
  const fs::path data = dir_ / "data", model = dir_ / "model";
  Fedlora({"make-data", "--out", data.string(), "--clients", "3", "--records", "48",
           "--test-records", "24", "--alpha", "0.5", "--seed", "1"});
  Fedlora({"init-model", "--preset", "tiny", "--seed", "2", "--init-std", "0.1", "--merges", "60",
           "--tokenizer-corpus", (data / "client-1.jsonl").string(), "--out", model.string()});
  const pid_t server = StartServer("fedit", "state",
                                   {"--rounds",
                                    "3",
                                    "--base-model-dir",
                                    model.string(),
                                    "--eval-data",
                                    (data / "test.jsonl").string(),
                                    "--eval-accuracy",
                                    "--eval-max-new-tokens",
                                    "4",
                                    "--target-modules",
                                    "q_proj,v_proj",
                                    "--local-steps",
                                    "4",
                                    "--learning-rate",
                                    "0.01",
                                    "--dp-clip",
                                    "10",
                                    "--dp-noise-multiplier",
                                    "1",
                                    "--linger-s",
                                    "300",
                                    "--metrics-listen",
                                    "127.0.0.1:0",
                                    "--metrics-port-file",
                                    (dir_ / "metrics.port").string()});
  ASSERT_FALSE(port_.empty()) << ReadText(dir_ / "state.log");
  const int metrics_port = std::stoi(WaitForFile(dir_ / "metrics.port", std::chrono::seconds(10)));

  const int prometheus_port = FreePort();
  const fs::path config = dir_ / "prometheus.yml";
  std::ofstream(config) << "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
                        << "scrape_configs:\n  - job_name: fedlora\n    static_configs:\n"
                        << "      - targets: ['127.0.0.1:" << metrics_port << "']\n";
  const pid_t prometheus =
      Track(Start({prometheus_, "--config.file=" + config.string(),
                   "--storage.tsdb.path=" + (dir_ / "tsdb").string(),
                   "--web.listen-address=127.0.0.1:" + std::to_string(prometheus_port)},
                  dir_ / "prometheus.log"));
  std::vector<pid_t> clients;
  for (int i = 1; i <= 3; ++i) {
    clients.push_back(StartClient(
        i, "run",
        {"--workload", "llm", "--model", model.string(), "--data",
         (data / ("client-" + std::to_string(i) + ".jsonl")).string(), "--batch", "8"}));
  }

  // During the run: the page shows the first round's held-out loss as metrics.jsonl has it.
  const auto first = MetricsOnceThere("state", 1);
  ASSERT_GE(first.size(), 1u) << ReadText(dir_ / "state.log");
  const std::string during = PageDom(metrics_port);
  EXPECT_NEAR(std::stod(Cell(during, "data-round", "1", "eval_loss")),
              first[0]["eval_loss"].get<double>(), 1e-5 * first[0]["eval_loss"].get<double>())
      << during;

  for (int i = 0; i < 3; ++i) ASSERT_EQ(Wait(clients[i], std::chrono::seconds(180)), 0);
  const auto lines = MetricsOnceThere("state", 3);
  ASSERT_EQ(lines.size(), 3u);
  const nlohmann::json& last = lines.back();

  // Prometheus, scraping the coordinator, reads back every round and the last line's numbers.
  EXPECT_EQ(QueryOnce(prometheus_port, "fedlora_rounds_committed_total", "3"), "3")
      << ReadText(dir_ / "prometheus.log");
  EXPECT_EQ(std::stod(Query(prometheus_port, "fedlora_eval_loss")),
            last["eval_loss"].get<double>());
  EXPECT_EQ(std::stod(Query(prometheus_port, "fedlora_eval_accuracy")),
            last["eval_accuracy"].get<double>());
  EXPECT_EQ(std::stod(Query(prometheus_port, "fedlora_dp_epsilon")),
            last["client_dp"]["epsilon"].get<double>());
  EXPECT_EQ(QueryOnce(prometheus_port, "fedlora_updates_total{result=\"accepted\"}", "9"), "9");
  EXPECT_EQ(Query(prometheus_port, "fedlora_clients{state=\"joined\"}"), "3");
  EXPECT_EQ(Query(prometheus_port, "fedlora_round_duration_seconds_count"), "3");
  EXPECT_GT(std::stod(Query(prometheus_port, "process_resident_memory_bytes")), 1e6);

  // After it: every round's row and every client, as metrics.jsonl says.
  const std::string after = PageDom(metrics_port);
  EXPECT_EQ(ById(after, "rounds-committed"), 3) << after;
  for (const nlohmann::json& line : lines) {
    const std::string round = std::to_string(line["round"].get<int>());
    const double loss = line["eval_loss"];
    EXPECT_NEAR(std::stod(Cell(after, "data-round", round, "eval_loss")), loss, 1e-5 * loss);
    const double epsilon = line["client_dp"]["epsilon"];  // shown to 4 digits
    EXPECT_NEAR(std::stod(Cell(after, "data-round", round, "dp_epsilon")), epsilon, 5e-4 * epsilon);
  }
  for (int i = 1; i <= 3; ++i) {
    EXPECT_EQ(Cell(after, "data-client", "client-" + std::to_string(i), "rejected"), "0") << after;
  }
  const CommandResult shot = RunProgram({chromium_, "--headless", "--no-sandbox", "--disable-gpu",
                                         "--virtual-time-budget=4000", "--window-size=1280,1600",
                                         "--screenshot=" + (dir_ / "page.png").string(),
                                         "http://127.0.0.1:" + std::to_string(metrics_port) + "/"});
  EXPECT_EQ(shot.exit_code, 0) << shot.output;
  EXPECT_EQ(ReadText(dir_ / "page.png").substr(1, 3), "PNG");
  kill(server, SIGTERM);
  EXPECT_EQ(Wait(server, std::chrono::seconds(20)), 0);  // stopped while it lingered, done
  kill(prometheus, SIGTERM);
  Wait(prometheus, std::chrono::seconds(20));
}

// Off the loopback interface the listener speaks TLS only, to operators: by a client certificate
// whose name is in --operators, or with the bearer token. Regression of the issue's "defences off
// by default": nothing is served in the clear beyond this machine.
TEST_F(FederationTest, OffLoopbackTheMetricsAreForOperatorsOverTlsOnly) {
  server::ServerOptions o;
  o.tls_cert = Cert("server.pem");
  o.tls_key = Cert("server.key");
  o.client_ca = Cert("ca.pem");
  o.metrics_listen = "0.0.0.0:0";
  EXPECT_THAT(std::string(o.Validate().message()),
              HasSubstr("metrics_listen 0.0.0.0:0 is off the loopback interface: say who may read "
                        "it, with operators"));
  o.operators = {"client-4"};
  o.metrics_token_file = (dir_ / "token").string();
  std::ofstream(o.metrics_token_file) << "s3cret-token\n";
  ASSERT_TRUE(o.Validate().ok()) << o.Validate();
  const auto view = std::make_shared<server::RunView>(nlohmann::json::object(), 60);
  auto listener = server::MetricsListener::Start(o, view);
  ASSERT_TRUE(listener.ok()) << listener.status();
  const int port = (*listener)->port();

  httplib::Client plain("127.0.0.1", port);
  EXPECT_FALSE(plain.Get("/metrics")) << "answered in the clear";
  const auto get = [&](const std::string& cert, const httplib::Headers& headers) {
    httplib::SSLClient tls("127.0.0.1", port, cert.empty() ? "" : Cert(cert + ".pem"),
                           cert.empty() ? "" : Cert(cert + ".key"));
    tls.set_ca_cert_path(Cert("ca.pem").c_str());
    tls.enable_server_certificate_verification(true);
    const auto res = tls.Get("/metrics", headers);
    return res ? res->status : -1;
  };
  EXPECT_EQ(get("", {}), 401);
  EXPECT_EQ(get("", {{"Authorization", "Bearer wrong-token!"}}), 401);
  EXPECT_EQ(get("", {{"Authorization", "Bearer s3cret-token"}}), 200);
  EXPECT_EQ(get("client-4", {}), 200);  // an operator
  EXPECT_EQ(get("client-1", {}), 401);  // a client: not an operator

  o.insecure = true;
  o.tls_cert = o.tls_key = o.client_ca = "";
  o.operators.clear();
  EXPECT_THAT(std::string(o.Validate().message()),
              HasSubstr("is served over TLS only, which insecure turns off"));
}

// gRPC's log goes through fedlora's rate limiter, and /metrics counts every failed handshake.
// Regression: 2,000 handshakes with certificates of another CA wrote 2,000 lines.
TEST_F(FederationTest, FailedHandshakesAreCountedAndLoggedOncePerWindow) {
  const CommandResult other =
      RunProgram({"bash", kSource + "/deploy/make_certs.sh", (dir_ / "other").string(), "1"});
  ASSERT_EQ(other.exit_code, 0) << other.output;
  const pid_t server = StartServer(
      "fedit", "state",
      {"--metrics-listen", "127.0.0.1:0", "--metrics-port-file", (dir_ / "metrics.port").string()});
  ASSERT_FALSE(port_.empty());
  const int metrics_port = std::stoi(WaitForFile(dir_ / "metrics.port", std::chrono::seconds(10)));
  const std::string cert = (dir_ / "other" / "client-1.pem").string();
  const std::string key = (dir_ / "other" / "client-1.key").string();
  const auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < 200; ++i)
    EXPECT_FALSE(common::ProbeTlsRefusal("127.0.0.1:" + port_, Cert("ca.pem"), cert, key).ok());
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  httplib::Client http("127.0.0.1", metrics_port);
  std::string body;
  for (int t = 0; t < 100; ++t) {
    const auto res = http.Get("/metrics");
    ASSERT_TRUE(res);
    body = res->body;
    if (body.find("fedlora_tls_handshake_failures_total 200\n") != std::string::npos) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  EXPECT_THAT(body, HasSubstr("fedlora_tls_handshake_failures_total 200\n"));
  kill(server, SIGTERM);
  Wait(server, std::chrono::seconds(20));
  const std::string log = ReadText(dir_ / "state.log");
  size_t lines = 0;
  for (size_t at = log.find("Handshake failed"); at != std::string::npos;
       at = log.find("Handshake failed", at + 1))
    ++lines;
  EXPECT_GE(lines, 1u) << log;
  // The first, then one per 10 s window while they went on (and one more at the window's end).
  EXPECT_LE(lines, 2 + static_cast<size_t>(seconds / 10)) << log;
  EXPECT_THAT(log, HasSubstr("warning [server] grpc: Handshake failed"));
}

TEST_F(FederationTest, OnLoopbackATokenFileStillGuardsTheMetrics) {
  server::ServerOptions o;
  o.insecure = true;
  o.metrics_listen = "127.0.0.1:0";
  o.metrics_token_file = (dir_ / "token").string();
  std::ofstream(o.metrics_token_file) << "tok\n";
  ASSERT_TRUE(o.Validate().ok());
  auto listener = server::MetricsListener::Start(
      o, std::make_shared<server::RunView>(nlohmann::json::object(), 60));
  ASSERT_TRUE(listener.ok()) << listener.status();
  httplib::Client http("127.0.0.1", (*listener)->port());
  const auto status = [&](const std::string& path, const httplib::Headers& headers) {
    const auto res = http.Get(path, headers);
    return res ? res->status : -1;
  };
  EXPECT_EQ(status("/metrics", {}), 401);
  EXPECT_EQ(status("/metrics", {{"Authorization", "Bearer tok"}}), 200);
  EXPECT_EQ(status("/nothing", {{"Authorization", "Bearer tok"}}), 404);
  const auto page = http.Get("/", {{"Authorization", "Bearer tok"}});
  ASSERT_TRUE(page);
  EXPECT_THAT(page->get_header_value("Content-Security-Policy"), HasSubstr("default-src 'none'"));
}

// Open to this machine without a token, a loopback listener still answers only requests made to
// its own address: a web page of another name that resolves to 127.0.0.1 (DNS rebinding) gets
// nothing.
TEST_F(FederationTest, OnLoopbackOnlyRequestsToTheListenersOwnNameAreAnswered) {
  server::ServerOptions o;
  o.insecure = true;
  o.metrics_listen = "127.0.0.1:0";
  auto listener = server::MetricsListener::Start(
      o, std::make_shared<server::RunView>(nlohmann::json::object(), 60));
  ASSERT_TRUE(listener.ok()) << listener.status();
  const std::string port = std::to_string((*listener)->port());
  httplib::Client http("127.0.0.1", (*listener)->port());
  const auto status = [&](const std::string& host) {
    const auto res = http.Get("/api/run", {{"Host", host}});
    return res ? res->status : -1;
  };
  EXPECT_EQ(status("127.0.0.1:" + port), 200);
  EXPECT_EQ(status("localhost:" + port), 200);
  EXPECT_EQ(status("attacker.example:" + port), 401);
  EXPECT_EQ(status("127.0.0.1:1"), 401);
}

}  // namespace
}  // namespace fedlora::testing
