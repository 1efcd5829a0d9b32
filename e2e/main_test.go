package e2e

import (
	"fmt"
	"os"
	"testing"
	"time"
)

// bins are the binaries TestMain built; read-only once the tests run.
var bins Binaries

func TestMain(m *testing.M) {
	if err := CheckPrerequisites(); err != nil {
		fmt.Fprintf(os.Stderr, "e2e: %v\n", err)
		os.Exit(1)
	}
	dir, err := os.MkdirTemp("", "edgewire-e2e-bin-")
	if err != nil {
		fmt.Fprintf(os.Stderr, "e2e: %v\n", err)
		os.Exit(1)
	}
	start := time.Now()
	bins, err = BuildBinaries(dir)
	if err != nil {
		os.RemoveAll(dir)
		fmt.Fprintf(os.Stderr, "e2e: %v\n", err)
		os.Exit(1)
	}
	fmt.Fprintf(os.Stderr, "e2e: built test binaries in %v\n", time.Since(start).Round(time.Millisecond))
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// needMeshctl fails t when meshctl could not be built.
func needMeshctl(t testing.TB) string {
	t.Helper()
	if bins.MeshctlErr != nil {
		t.Fatalf("meshctl is needed and did not build: %v", bins.MeshctlErr)
	}
	return bins.Meshctl
}
