package relay

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"runtime"
	"strings"
	"testing"
)

// allocated returns the bytes f allocates per call, averaged over n calls.
func allocated(n int, f func()) uint64 {
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	for range n {
		f()
	}
	runtime.ReadMemStats(&after)
	return (after.TotalAlloc - before.TotalAlloc) / uint64(n)
}

func TestReadFrameAllocation(t *testing.T) {
	header := func(n uint32) []byte { return binary.BigEndian.AppendUint32(nil, n) }
	tests := []struct {
		name     string
		input    []byte
		limit    uint32
		wantErr  error  // wrapped by the error, or nil for any error
		maxAlloc uint64 // bytes per call
	}{
		{
			name: "oversized before authentication", input: header(MaxControlFrame),
			limit: maxPreAuthFrame, wantErr: errFrameTooLarge, maxAlloc: 512,
		},
		{
			name: "oversized after authentication", input: header(1 << 30),
			limit: MaxControlFrame, wantErr: errFrameTooLarge, maxAlloc: 512,
		},
		{
			// A peer that announces the largest frame and sends 10 bytes costs what it sent (one
			// chunk), not what it announced.
			name: "announced 1 MiB, sent 10 bytes", input: append(header(MaxControlFrame), "0123456789"...),
			limit: MaxControlFrame, wantErr: io.ErrUnexpectedEOF, maxAlloc: 2 * frameReadChunk,
		},
		{
			name: "announced 1 MiB, sent 100 KiB", input: append(header(MaxControlFrame), bytes.Repeat([]byte{' '}, 100<<10)...),
			limit: MaxControlFrame, wantErr: io.ErrUnexpectedEOF, maxAlloc: 4 * 100 << 10,
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var err error
			got := allocated(20, func() { _, err = readFrame(bytes.NewReader(tc.input), tc.limit) })
			if !errors.Is(err, tc.wantErr) {
				t.Fatalf("error %v, want %v", err, tc.wantErr)
			}
			if got > tc.maxAlloc {
				t.Fatalf("allocated %d bytes per frame, want at most %d", got, tc.maxAlloc)
			}
			t.Logf("%d bytes allocated per frame", got)
		})
	}
	t.Run("a full frame still reads", func(t *testing.T) {
		body := `{"type":"ping","t":1}` + strings.Repeat(" ", 300<<10)
		m, err := readFrame(strings.NewReader(string(header(uint32(len(body))))+body), MaxControlFrame)
		if err != nil || m.Type != msgPing || m.T != 1 {
			t.Fatalf("readFrame: %+v, %v", m, err)
		}
	})
}

func TestSessionQueues(t *testing.T) {
	s := &Server{metrics: newMetrics()}
	newSession := func() *session {
		return &session{srv: s, out: make(chan []byte, outQueue), dirReady: make(chan struct{}, 1), done: make(chan struct{})}
	}
	t.Run("frames beyond the queue are dropped and counted", func(t *testing.T) {
		ss := newSession()
		before := s.metrics.controlDropped[dropQueueFull].Load()
		for range outQueue + 10 {
			ss.send([]byte("pong"))
		}
		if got := s.metrics.controlDropped[dropQueueFull].Load() - before; got != 10 {
			t.Fatalf("dropped %d, want 10", got)
		}
		if len(ss.out) != outQueue {
			t.Fatalf("queue holds %d frames, want %d", len(ss.out), outQueue)
		}
		select {
		case <-ss.done:
			t.Fatal("a full queue closed the session")
		default:
		}
	})
	t.Run("a newer directory replaces an unwritten one", func(t *testing.T) {
		ss := newSession()
		before := s.metrics.dirSuperseded.Load()
		for i := range 5 {
			ss.sendDirectory([]byte{byte(i)})
		}
		if got := s.metrics.dirSuperseded.Load() - before; got != 4 {
			t.Fatalf("superseded %d, want 4", got)
		}
		if f := ss.dir.Load(); f == nil || !bytes.Equal(*f, []byte{4}) {
			t.Fatalf("pending directory %v, want the last one", f)
		}
		if len(ss.dirReady) != 1 {
			t.Fatal("writer not woken")
		}
	})
}
