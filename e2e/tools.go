package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
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
	// MeshctlErr is why meshctl could not be built; tests that need the agent fail with it.
	MeshctlErr error
}

// BuildBinaries builds meshctl and testserver into dir. A testserver build failure is returned;
// a meshctl failure is recorded in MeshctlErr so that harness tests can still run.
func BuildBinaries(dir string) (Binaries, error) {
	b := Binaries{
		Meshctl:    filepath.Join(dir, "meshctl"),
		Testserver: filepath.Join(dir, "testserver"),
	}
	if err := goBuild(b.Testserver, "github.com/edgewire/edgewire/e2e/testserver"); err != nil {
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
