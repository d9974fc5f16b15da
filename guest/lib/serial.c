/*
 * serial.c - polled output on the 16550 UART at 0x3f8, and guest_exit().
 *
 * Byte-exact: every byte is sent as is ("\n" stays one 0x0a).  Before each
 * byte we wait for LSR.THRE (bit 5).  From CPL 3 the port accesses are
 * allowed by the TSS I/O bitmap (entry.S); the exception report uses the
 * same code at CPL 0.
 */
#include "guest.h"

#define COM1     0x3f8
#define UART_THR 0      /* transmit holding register (DLAB=0) */
#define UART_DLL 0      /* divisor latch low (DLAB=1) */
#define UART_IER 1      /* interrupt enable (DLAB=0) */
#define UART_DLM 1      /* divisor latch high (DLAB=1) */
#define UART_FCR 2      /* FIFO control */
#define UART_LCR 3      /* line control */
#define UART_LSR 5      /* line status */
#define LCR_8N1  0x03
#define LCR_DLAB 0x80
#define FCR_FIFO 0x07   /* enable and clear both FIFOs */
#define LSR_THRE 0x20

#define DEBUG_EXIT_PORT 0x501

static int serial_ready;

static void serial_init(void)
{
    outb(COM1 + UART_IER, 0);           /* we poll */
    outb(COM1 + UART_LCR, LCR_DLAB);
    outb(COM1 + UART_DLL, 1);           /* 115200 baud */
    outb(COM1 + UART_DLM, 0);
    outb(COM1 + UART_LCR, LCR_8N1);
    outb(COM1 + UART_FCR, FCR_FIFO);
    serial_ready = 1;
}

void serial_putc(char c)
{
    if (!serial_ready)
        serial_init();
    while (!(inb(COM1 + UART_LSR) & LSR_THRE))
        cpu_relax();
    outb(COM1 + UART_THR, (uint8_t)c);
}

void serial_write(const char *s, size_t n)
{
    while (n--)
        serial_putc(*s++);
}

int putchar(int c)
{
    serial_putc((char)c);
    return (unsigned char)c;
}

int puts(const char *s)
{
    serial_write(s, strlen(s));
    serial_putc('\n');
    return 0;
}

void guest_exit(int v)
{
    outb(DEBUG_EXIT_PORT, (uint8_t)v);
    /* Should the VMM keep running us: spin (hlt would fault at CPL 3). */
    for (;;)
        cpu_relax();
}
