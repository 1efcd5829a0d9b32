package trim

import (
	"os"
	"strconv"
	"strings"
	"testing"
)

// rss reads the process's resident set size.
func rss(t *testing.T) uint64 {
	t.Helper()
	data, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, err := strconv.ParseUint(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			if err != nil {
				t.Fatal(err)
			}
			return kb << 10
		}
	}
	t.Fatal("no VmRSS")
	return 0
}

func TestTrim(t *testing.T) {
	const n, size = 128, 64 << 10
	bufs := make([][]byte, n)
	for i := range bufs {
		bufs[i] = make([]byte, size)
		for j := range bufs[i] {
			bufs[i][j] = 0xa5 // every page resident
		}
	}
	var tr Trimmer
	var h Holder
	tr.Maybe(&h, bufs)
	if tr.Trimmed() != 0 || bufs[7][100] != 0xa5 {
		t.Fatal("trimmed without a request")
	}
	before := rss(t)
	tr.Request()
	tr.Maybe(&h, bufs)
	after := rss(t)
	// Each 64 KiB buffer spans at least 15 whole pages.
	if got, want := tr.Trimmed(), uint64(n*15*int(pageSize)); got < want {
		t.Errorf("trimmed %d bytes, want at least %d", got, want)
	}
	if before-after < 6<<20 {
		t.Errorf("RSS %d -> %d: the 8 MiB of buffers did not leave", before, after)
	}
	// The buffers still work: the trimmed pages read as zero and take writes.
	bufs[7][100] = 1
	if bufs[7][100] != 1 || bufs[7][5000] != 0 {
		t.Errorf("buffer after trim: %d %d", bufs[7][100], bufs[7][5000])
	}
	// One request, one trim.
	trimmed := tr.Trimmed()
	tr.Maybe(&h, bufs)
	if tr.Trimmed() != trimmed {
		t.Error("trimmed twice for one request")
	}
	var nilT *Trimmer
	nilT.Maybe(&h, bufs) // a nil Trimmer is off
}
