package e2e

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// Tool is a program the tests run and the Debian package that provides it.
type Tool struct {
	Command string
	Package string
}

// RequiredTools are the programs every e2e run needs.
var RequiredTools = []Tool{
	{"ip", "iproute2"},
	{"curl", "curl"},
	{"dig", "dnsutils"},
	{"socat", "socat"},
	{"wg", "wireguard-tools"},
	{"tcpdump", "tcpdump"},
	{"iptables", "iptables"},
	{"sysctl", "procps"},
	{"iperf3", "iperf3"},
	{"prlimit", "util-linux"},
}

// CheckPrerequisites returns an error saying what to do when the tests cannot run here: not root,
// a missing tool, no TUN device.
func CheckPrerequisites() error {
	if os.Geteuid() != 0 {
		return fmt.Errorf("the e2e tests must run as root (they create network namespaces and TUN devices); run them with sudo or as root")
	}
	var missing []string
	for _, tool := range RequiredTools {
		if _, err := exec.LookPath(tool.Command); err != nil {
			missing = append(missing, fmt.Sprintf("%s (package %s)", tool.Command, tool.Package))
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("run `make deps` (scripts/install-deps.sh) to install %s", strings.Join(missing, ", "))
	}
	if _, err := os.Stat("/dev/net/tun"); err != nil {
		return fmt.Errorf("no TUN device: %w (load the tun module: modprobe tun)", err)
	}
	return nil
}

// Binaries are the paths of the programs built for the tests.
type Binaries struct {
	Meshctl    string
	Testserver string
	// Benchtool is e2e/benchtool: the load generators and the probing client of the load tests.
	Benchtool string
	// MeshctlErr is why meshctl could not be built; tests that need the agent fail with it.
	MeshctlErr error
}

// BuildBinaries builds meshctl, testserver and benchtool into dir. A testserver or benchtool build
// failure is returned; a meshctl failure is recorded in MeshctlErr so that harness tests can still
// run.
func BuildBinaries(dir string) (Binaries, error) {
	b := Binaries{
		Meshctl:    filepath.Join(dir, "meshctl"),
		Testserver: filepath.Join(dir, "testserver"),
		Benchtool:  filepath.Join(dir, "benchtool"),
	}
	if err := goBuild(b.Testserver, "github.com/edgewire/edgewire/e2e/testserver"); err != nil {
		return b, err
	}
	if err := goBuild(b.Benchtool, "github.com/edgewire/edgewire/e2e/benchtool"); err != nil {
		return b, err
	}
	b.MeshctlErr = goBuild(b.Meshctl, "github.com/edgewire/edgewire/cmd/meshctl")
	return b, nil
}

func goBuild(out, pkg string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	goBin := "go"
	if _, err := exec.LookPath(goBin); err != nil {
		goBin = "/usr/local/go/bin/go"
	}
	cmd := exec.CommandContext(ctx, goBin, "build", "-o", out, pkg)
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go build %s: %w\n%s", pkg, err, b)
	}
	return nil
}

// GoTools returns the directory holding the binaries that `scripts/go-tools.sh name` builds from the
// tools module tools/<name> (kube-apiserver and etcd for "k8s", CoreDNS for "coredns"), building
// them on first use: the script caches them between runs, so only a machine's first run waits
// (10-20 minutes for k8s, a few for coredns). It fails t when a binary is missing afterwards.
func GoTools(t testing.TB, name string, binaries ...string) string {
	t.Helper()
	script, err := filepath.Abs("../scripts/go-tools.sh")
	if err != nil {
		t.Fatalf("%s tools: %v", name, err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 40*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, script, name, "--print-dir")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("build %s (scripts/go-tools.sh %s): %v\n%s", strings.Join(binaries, " and "), name, err, lastLines(stderr.String(), 30))
	}
	dir := strings.TrimSpace(string(out))
	for _, b := range binaries {
		if _, err := os.Stat(filepath.Join(dir, b)); err != nil {
			t.Fatalf("%s tools: %v (remove %s and run scripts/go-tools.sh %s)", name, err, dir, name)
		}
	}
	return dir
}
