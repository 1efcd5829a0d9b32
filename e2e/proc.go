package e2e

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Proc is a long-running process in a namespace, its stdout and stderr going to a log file in the
// lab's directory. The lab stops it at teardown if the test did not.
type Proc struct {
	// Name identifies the process in logs ("agent", "b1-http").
	Name string
	// LogPath is the file receiving its stdout and stderr.
	LogPath string

	cmd  *exec.Cmd
	done chan struct{} // closed when the process has exited; err is then set
	err  error
}

// Start runs args in n in the background. The process's own PID is the one Proc signals:
// `ip netns exec` execs the command in place.
func (n *Node) Start(t testing.TB, name string, args ...string) *Proc {
	t.Helper()
	return n.lab.start(t, n.Role, name, append([]string{"ip", "netns", "exec", n.NS}, args...))
}

// StartRoot runs args in the root network namespace, like Node.Start (for servers that tests reach
// through an interface AttachRoot made, such as the Kubernetes API server).
func (l *Lab) StartRoot(t testing.TB, name string, args ...string) *Proc {
	t.Helper()
	return l.start(t, "root", name, args)
}

func (l *Lab) start(t testing.TB, role, name string, argv []string) *Proc {
	t.Helper()
	logPath := filepath.Join(l.Dir, fmt.Sprintf("%s-%s.log", role, name))
	f, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatalf("start %s: log file: %v", name, err)
	}
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stdout, cmd.Stderr = f, f
	if err := cmd.Start(); err != nil {
		f.Close()
		t.Fatalf("start %s in %s: %s: %v", name, role, strings.Join(argv, " "), err)
	}
	p := &Proc{Name: name, LogPath: logPath, cmd: cmd, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		f.Close()
		close(p.done)
	}()
	l.mu.Lock()
	l.procs = append(l.procs, p)
	l.mu.Unlock()
	return p
}

// PID returns the process id.
func (p *Proc) PID() int { return p.cmd.Process.Pid }

// Exited reports whether the process has ended.
func (p *Proc) Exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// Signal sends sig to the process (a no-op once it has exited).
func (p *Proc) Signal(sig syscall.Signal) error {
	if p.Exited() {
		return nil
	}
	if err := p.cmd.Process.Signal(sig); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return fmt.Errorf("signal %s to %s (pid %d): %w", sig, p.Name, p.PID(), err)
	}
	return nil
}

// Wait waits up to timeout for the process to exit and returns its exit error (nil for status 0).
func (p *Proc) Wait(timeout time.Duration) error {
	if !p.Exited() {
		timer := time.NewTimer(timeout)
		defer timer.Stop()
		select {
		case <-p.done:
		case <-timer.C:
			return fmt.Errorf("%s (pid %d) still running after %v", p.Name, p.PID(), timeout)
		}
	}
	if p.err != nil {
		return fmt.Errorf("%s: %w", p.Name, p.err)
	}
	return nil
}

// Stop sends SIGTERM and waits up to grace for the process to exit, then SIGKILLs it. It returns
// the exit error, or an error saying it had to be killed.
func (p *Proc) Stop(grace time.Duration) error {
	if p.Exited() {
		return p.Wait(0)
	}
	if err := p.Signal(syscall.SIGTERM); err != nil {
		return err
	}
	err := p.Wait(grace)
	if p.Exited() {
		return err
	}
	if err := p.Signal(syscall.SIGKILL); err != nil {
		return err
	}
	if err := p.Wait(5 * time.Second); !p.Exited() {
		return err
	}
	return fmt.Errorf("%s (pid %d) did not exit within %v of SIGTERM: killed", p.Name, p.PID(), grace)
}

// Log returns the whole log so far.
func (p *Proc) Log() string {
	b, err := os.ReadFile(p.LogPath)
	if err != nil {
		return fmt.Sprintf("(reading %s: %v)", p.LogPath, err)
	}
	return string(b)
}

// Tail returns the last n lines of the log.
func (p *Proc) Tail(n int) string {
	lines := strings.Split(strings.TrimRight(p.Log(), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// WaitLog waits up to timeout for the log to contain substr; it fails t, showing the log's tail,
// if it does not or if the process exits first.
func (p *Proc) WaitLog(t testing.TB, substr string, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		b, _ := os.ReadFile(p.LogPath)
		if bytes.Contains(b, []byte(substr)) {
			return
		}
		if p.Exited() {
			t.Fatalf("%s exited (%v) before logging %q; log tail:\n%s", p.Name, p.Wait(0), substr, p.Tail(30))
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s did not log %q within %v; log tail:\n%s", p.Name, substr, timeout, p.Tail(30))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// lastLines returns the last n lines of s.
func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
